"""The ConsistentID networks, the adapter-index -> UNet layer table, the checkpoint loader and the
ID-token attention term that the patch adds to every cross-attention layer."""
