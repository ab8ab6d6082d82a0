"""Model folders: entries from extra_model_paths.yaml survive the pack's registration."""

import pytest

from comfy_harness import comfy_session, comfyui_path_or_skip

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    comfyui_path_or_skip()
    return comfy_session(tmp_path_factory.mktemp("comfyui"))


def test_extra_model_paths_entries_keep_working(session, tmp_path):
    folder_paths = session.folder_paths
    folders = session.pack_submodule("nodes.glue.folders")
    shared = tmp_path / "shared_models" / "consistentid"
    shared.mkdir(parents=True)
    (shared / "ConsistentID-from-yaml.bin").write_bytes(b"x")
    (shared / "face_parsing.pth").write_bytes(b"x")
    saved = {name: (list(paths), set(exts)) for name, (paths, exts) in folder_paths.folder_names_and_paths.items()
             if name in (folders.CONSISTENTID, folders.FACEXLIB, folders.INSIGHTFACE)}
    try:
        # what utils.extra_config does for a `consistentid:` entry of extra_model_paths.yaml
        folder_paths.add_model_folder_path(folders.CONSISTENTID, str(shared))
        folders.register_model_folders()  # the pack registering again (ComfyUI calls get_node_list)
        paths, extensions = folder_paths.folder_names_and_paths[folders.CONSISTENTID]
        assert str(shared) in paths and ".bin" in extensions
        session.refresh_file_lists()
        assert "ConsistentID-from-yaml.bin" in folders.weight_files(folders.CONSISTENTID)
        assert "face_parsing.pth" not in folders.weight_files(folders.CONSISTENTID)
        assert f"{folders.CONSISTENTID}/face_parsing.pth" in folders.parser_files()
    finally:
        for name, (paths, exts) in saved.items():
            folder_paths.folder_names_and_paths[name] = (paths, exts)
        session.refresh_file_lists()
