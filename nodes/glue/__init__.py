"""The ComfyUI glue every node module shares: socket types and categories, shared inputs, image and
mask conversion, progress, model folders, the face parser's and the patches' memory hooks, the
attention patch on the MODEL, the prompt on the CLIP, and the CLIP vision encoder.

Node modules import from here and from the core, never from each other."""
