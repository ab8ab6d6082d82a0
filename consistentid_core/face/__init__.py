"""From a photo to features: insightface detection and ArcFace, BiSeNet parsing into the five
facial regions, CLIP ViT-H inputs, the per-photo encode cache and the preview pictures."""
