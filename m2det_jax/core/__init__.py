"""Pure functions every stage shares: `box_ops` (box formats, IoU, encode/decode),
`priors` (the anchor boxes of a config), `preprocess` (network-input normalisation and the
test-time resize)."""
