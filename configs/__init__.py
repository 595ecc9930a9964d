"""The shipped configs (installed as `m2det_jax.configs`): one file per variant, loaded by
path or by bare name through `m2det_jax.load_config`."""
