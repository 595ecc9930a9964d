"""m2det-jax tests (a package, so that tests import `tests.helpers`)."""
