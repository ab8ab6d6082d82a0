"""The text side: the facial caption and its markers, ComfyUI's emphasis syntax, the facial and
text-only conditionings with the merge step, and per-region control of the fused tokens."""
