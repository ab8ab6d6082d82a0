"""ComfyUI entry point of the ConsistentID node pack (V3 schema).

ComfyUI imports this folder as a package; the pack imports its own modules relatively so that
its ``nodes`` sub-package never shadows ComfyUI's top-level ``nodes`` module.  The import of
the node layer is deferred to ``comfy_entrypoint`` so that importing this file outside ComfyUI
(pytest collects it as a package) does not need ComfyUI.

``WEB_DIRECTORY`` is read by ComfyUI's loader for V1 and V3 packs alike (``nodes.load_custom_node``
checks it before it looks for ``comfy_entrypoint``) and served at ``/extensions/<folder name>/``;
the frontend's node-library help panel fetches ``docs/<node id>.md`` from there.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import ConsistentIDExtension

    return ConsistentIDExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
