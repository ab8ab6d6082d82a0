"""Thin ComfyUI layer over consistentid_core (V3 nodes).  Only import this from inside ComfyUI."""
