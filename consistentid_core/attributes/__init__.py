"""FlexID extrinsic attributes (hair, glasses, hat, earrings, necklace): which pixels of a photo
carry them, their CLIP features, and the attribute branch that turns them into attention tokens."""
