"""Screenshots of the example workflows as ComfyUI's frontend draws them: docs/screenshots/<name>.png.

With ``--help-page [NODE_ID]`` (and with no arguments at all) it also opens one node's help page from
the node library (default ConsistentIDEncodeFace) and writes docs/screenshots/help_page.png.

Starts ComfyUI (``COMFYUI_PATH``) as a server on a free local port with all its folders in a
temporary base directory, whose ``custom_nodes`` holds a symlink to this repository; opens the
frontend in headless Chromium (Debian's ``chromium`` driven by playwright: no browser download);
loads each ``example_workflows/*.json``, fits it into the window and saves a PNG.  The browser may
reach only the local server, and the temporary directory (symlink included) is removed at the end.

    apt-get install chromium && pip install playwright
    COMFYUI_PATH=/path/to/ComfyUI python tools/screenshot_workflows.py [name ...] [--help-page [NODE_ID]]

For the help page it checks that the server answers the URL the frontend fetches
(``/extensions/<pack folder>/docs/<node id>.md``) with ``web/docs/<node id>.md``, and that the panel
opened from the node library's help button shows that page's text, not the frontend's fallback.

For each workflow it prints the node types the frontend did not know, nodes drawn with errors,
dialogs it closed, nodes that overlap once the frontend has sized them, and every difference
between the files and what the frontend itself makes of the loaded graph: the prompt it would
queue against ``example_workflows/api/<name>_api.json``, and the slots, widget values and links it would
save against the UI file.  The exit status is 1 when any of these turned up (the PNGs are written
all the same, to look at).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_DIR = os.path.join(REPO, "example_workflows")
API_DIR = os.path.join(REPO, "example_workflows", "api")
OUT_DIR = os.path.join(REPO, "docs", "screenshots")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
VIEWPORT = {"width": 1600, "height": 900}
DEVICE_SCALE = 2  # a 16-node graph fits 1600x900 at about 45% zoom: twice the pixels keep its text legible
SERVER_START_TIMEOUT = 600  # seconds; importing torch and every built-in node is slow on 2 cores
PACK_LINK_NAME = "ConsistentID"
DOCS_DIR = os.path.join(REPO, "web", "docs")
HELP_NODE = "ConsistentIDEncodeFace"
HELP_PNG = "help_page.png"
HELP_WORKFLOW = os.path.join(UI_DIR, "sd15_portrait.json")  # drawn behind the panel, when it has the node
HELP_PANEL_WIDTH = 620  # pixels: the sidebar is dragged this wide, so that the page's tables are readable

# Frontend settings for a clean picture: no first-run tutorial, no minimap or render statistics over
# the graph, no tab bar (the menu bar still names the workflow), and text drawn at every zoom (by
# default it turns into grey bars below about 60%).
# The missing-nodes warning stays on: a dialog about it is a finding, not noise.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
}

# Runs in the page: load one workflow, then report what the frontend made of it.
LOAD_WORKFLOW_JS = """
async ([workflow, name]) => {
  const app = window.app;
  const known = new Set(Object.keys(window.LiteGraph?.registered_node_types ?? {}));
  const unknown = workflow.nodes.map((n) => n.type).filter((t) => known.size && !known.has(t));
  await app.loadGraphData(workflow, true, false, name);
  const written = Object.fromEntries(workflow.nodes.map((n) => [n.id, n.size]));
  const nodes = app.graph.nodes.map((node) => ({
    id: node.id,
    type: node.type,
    title: node.title,
    rect: Array.from(node.boundingRect),
    size: Array.from(node.size),
    written: written[node.id],
    errors: Boolean(node.has_errors),
  }));
  // What the frontend itself would save and queue for the graph it has just built.
  const { workflow: saved, output: prompt } = await app.graphToPrompt();
  return { unknown, nodes, saved, prompt };
}
"""

# Runs in the page: the view that shows every node, with a margin, in the visible canvas.
FIT_VIEW_JS = """
({ top, left }) => {
  const canvas = window.app.canvas;
  const rects = window.app.graph.nodes.map((n) => n.boundingRect);
  const x0 = Math.min(...rects.map((r) => r[0])), y0 = Math.min(...rects.map((r) => r[1]));
  const x1 = Math.max(...rects.map((r) => r[0] + r[2])), y1 = Math.max(...rects.map((r) => r[1] + r[3]));
  const width = canvas.canvas.width / window.devicePixelRatio - left;
  const height = canvas.canvas.height / window.devicePixelRatio - top;
  const margin = 30;
  const scale = Math.min((width - 2 * margin) / (x1 - x0), (height - 2 * margin) / (y1 - y0), 1);
  canvas.ds.scale = scale;
  canvas.ds.offset = [left / scale + (width / scale - (x1 - x0)) / 2 - x0,
                      top / scale + (height / scale - (y1 - y0)) / 2 - y0];
  canvas.setDirty(true, true);
  return scale;
}
"""

# Runs in the page: how much of the window the menus cover, so that the fit leaves it out.
CHROME_INSETS_JS = """
() => {
  const bottomOf = (sel) => Math.max(0, ...[...document.querySelectorAll(sel)].map((e) => e.getBoundingClientRect())
    .filter((r) => r.width > 0 && r.top < 5 && r.width > window.innerWidth / 2).map((r) => r.bottom));
  const rightOf = (sel) => Math.max(0, ...[...document.querySelectorAll(sel)].map((e) => e.getBoundingClientRect())
    .filter((r) => r.height > window.innerHeight / 2 && r.left < 5 && r.width < window.innerWidth / 3).map((r) => r.right));
  return { top: bottomOf('.comfyui-menu, .actionbar, nav, header, .comfyui-body-top *'),
           left: rightOf('.side-tool-bar-container, .comfyui-body-left *') };
}
"""

# Runs in the page: centre the first node of a type in the visible canvas (right of ``left``, below ``top``).
CENTER_NODE_JS = """
([type, { top, left }, scale]) => {
  const canvas = window.app.canvas;
  const node = window.app.graph.nodes.find((n) => n.type === type);
  if (!node) return false;
  const [x, y, w, h] = node.boundingRect;
  const width = canvas.canvas.width / window.devicePixelRatio - left;
  const height = canvas.canvas.height / window.devicePixelRatio - top;
  canvas.ds.scale = scale;
  canvas.ds.offset = [left / scale + (width / scale - w) / 2 - x, top / scale + (height / scale - h) / 2 - y];
  canvas.setDirty(true, true);
  return true;
}
"""

OPEN_DIALOGS_JS = """
() => [...document.querySelectorAll('.p-dialog')].filter((d) => d.offsetParent !== null)
  .map((d) => (d.querySelector('.p-dialog-title, .p-dialog-header')?.innerText || d.innerText).trim().slice(0, 200))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_base_dir(base: str) -> None:
    custom_nodes = os.path.join(base, "custom_nodes")
    os.makedirs(custom_nodes)
    os.symlink(REPO, os.path.join(custom_nodes, PACK_LINK_NAME), target_is_directory=True)
    settings_dir = os.path.join(base, "user", "default")
    os.makedirs(settings_dir)
    with open(os.path.join(settings_dir, "comfy.settings.json"), "w") as f:
        json.dump(SETTINGS, f)


def start_server(comfyui: str, base: str, port: int, log_path: str) -> subprocess.Popen:
    command = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", base, "--database-url", "sqlite:///:memory:",
        "--disable-auto-launch", "--disable-api-nodes",
    ]
    # No bytecode files: the ComfyUI checkout and this repository stay as they are.
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=comfyui, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for_server(process: subprocess.Popen, url: str, log_path: str) -> dict:
    """The server's /object_info once it answers."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with status {process.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/object_info", timeout=30) as response:
                return json.load(response)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    raise RuntimeError(f"ComfyUI did not answer within {SERVER_START_TIMEOUT}s:\n{tail(log_path)}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def overlaps(nodes: list[dict]) -> list[str]:
    found = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["rect"], b["rect"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                found.append(f"{a['title']!r} and {b['title']!r}")
    return found


def open_frontend(browser, url: str):
    """A page with the frontend ready, in a context of its own: one workflow tab, no state from before."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=DEVICE_SCALE)
    # Nothing but the local server: the pictures must neither depend on nor reach anything outside.
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                  or route.request.url.startswith(("data:", "blob:")) else route.abort())
    page = context.new_page()
    page.goto(url)
    page.wait_for_function("() => window.app?.graph && window.app?.canvas && "
                           "Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 100", timeout=120_000)
    page.wait_for_timeout(1000)
    close_dialogs(page)
    return context, page


def shoot(browser, url: str, path: str) -> list[str]:
    """Loads one workflow, writes its PNG and returns the problems seen."""
    name = os.path.splitext(os.path.basename(path))[0]
    workflow = read_json(path)
    context, page = open_frontend(browser, url)
    try:
        insets = page.evaluate(CHROME_INSETS_JS)
        report = page.evaluate(LOAD_WORKFLOW_JS, [workflow, name])
        page.wait_for_timeout(500)
        dialogs = close_dialogs(page)
        scale = page.evaluate(FIT_VIEW_JS, insets)
        # Park the pointer on the empty band above the graph, where it highlights nothing.
        page.mouse.move(VIEWPORT["width"] / 2, insets["top"] + 5)
        page.wait_for_timeout(800)
        os.makedirs(OUT_DIR, exist_ok=True)
        out = os.path.join(OUT_DIR, f"{name}.png")
        page.screenshot(path=out)
    finally:
        context.close()
    problems = [f"unknown node type {t}" for t in report["unknown"]]
    problems += [f"node {n['id']} ({n['type']}) has errors" for n in report["nodes"] if n["errors"]]
    problems += [f"dialog: {d}" for d in dialogs]
    problems += [f"overlap: {pair}" for pair in overlaps(report["nodes"])]
    problems += frontend_disagreements(name, workflow, report["saved"], report["prompt"])
    grown = [f"{n['title']} {n['written']} -> {[round(v) for v in n['size']]}" for n in report["nodes"]
             if n["written"] and any(s > w + 1 for s, w in zip(n["size"], n["written"]))]
    print(f"{os.path.relpath(out, REPO)}: {len(report['nodes'])} nodes, zoom {scale:.2f}"
          + "".join(f"\n  problem: {p}" for p in problems)
          + "".join(f"\n  resized by the frontend: {g}" for g in grown))
    return problems


def slots_and_values(node: dict) -> dict:
    return {"inputs": [(s["name"], s["type"], s["link"], (s.get("widget") or {}).get("name")) for s in node["inputs"]],
            "outputs": [(s["name"], s["type"], sorted(s["links"] or [])) for s in node["outputs"]],
            "widgets_values": node.get("widgets_values", [])}


def frontend_disagreements(name: str, workflow: dict, saved: dict, prompt: dict) -> list[str]:
    """Where the frontend's own save and prompt of the loaded graph differ from the files."""
    problems = []
    api = read_json(os.path.join(API_DIR, f"{name}_api.json"))
    if prompt != api:
        differing = sorted(k for k in set(prompt) | set(api) if prompt.get(k) != api.get(k))
        problems += [f"frontend prompt differs at node {k}: {prompt.get(k)} != {api.get(k)}" for k in differing]
    ours = {n["id"]: slots_and_values(n) for n in workflow["nodes"]}
    theirs = {n["id"]: slots_and_values(n) for n in saved["nodes"]}
    problems += [f"frontend saves node {k} as {theirs.get(k)}, the file has {ours.get(k)}"
                 for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if sorted(saved["links"]) != sorted(workflow["links"]):
        problems.append(f"frontend saves the links as {saved['links']}")
    return problems


def help_page_path(object_info: dict, node_id: str) -> str:
    """The URL path the frontend fetches for a custom node's help (NodeHelpService.fetchCustomNodeHelp):
    the pack is the second part of the node's python_module, cut at "@"."""
    pack = object_info[node_id]["python_module"].split(".")[1].split("@")[0]
    return f"/extensions/{urllib.parse.quote(pack)}/docs/{node_id}.md"


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def check_help_over_http(url: str, object_info: dict, node_id: str) -> list[str]:
    """The server answers the frontend's URL with the page, and no locale variant shadows it."""
    path = help_page_path(object_info, node_id)
    with open(os.path.join(DOCS_DIR, f"{node_id}.md"), encoding="utf-8") as f:
        expected = f.read()
    status, body = http_get(url + path)
    problems = [] if status == 200 and body == expected else [f"GET {path}: {status}, not web/docs/{node_id}.md"]
    # The frontend asks for <node id>/<locale>.md first; only a 404 there lets it fall back to <node id>.md.
    locale_path = path[: -len(".md")] + "/en.md"
    status, _ = http_get(url + locale_path)
    if status != 404:
        problems.append(f"GET {locale_path}: {status}; the frontend would show that instead of {path}")
    print(f"GET {path}: ok" if not problems else "".join(f"  problem: {p}\n" for p in problems).rstrip())
    return problems


def page_text(markdown: str) -> list[str]:
    """Plain-text pieces of a page that its rendered HTML must contain: its paragraphs' first sentences,
    its headings and the input and output names."""
    pieces = re.findall(r"^## (.+)$", markdown, flags=re.M)
    pieces += re.findall(r"^\| `([^`]+)` \|", markdown, flags=re.M)
    for paragraph in re.split(r"\n\s*\n", markdown):
        if paragraph and not paragraph.startswith(("#", "|")):
            plain = re.sub(r"[`*]", "", " ".join(paragraph.split()))
            pieces.append(plain.split(". ")[0])
    return pieces


def shoot_help_page(browser, url: str, object_info: dict, node_id: str) -> list[str]:
    """Opens the node library, then the help of ``node_id`` through its help button; writes HELP_PNG."""
    info = object_info[node_id]
    with open(os.path.join(DOCS_DIR, f"{node_id}.md"), encoding="utf-8") as f:
        expected = page_text(f.read())
    context, page = open_frontend(browser, url)
    problems = []
    try:
        if os.path.isfile(HELP_WORKFLOW) and node_id in {n["type"] for n in read_json(HELP_WORKFLOW)["nodes"]}:
            name = os.path.splitext(os.path.basename(HELP_WORKFLOW))[0]
            page.evaluate(LOAD_WORKFLOW_JS, [read_json(HELP_WORKFLOW), name])
            close_dialogs(page)
        page.locator(".node-library-tab-button").click()
        tree = page.locator(".node-lib-tree-explorer")
        tree.wait_for(timeout=30_000)
        # Down the category path (ConsistentID/encode), as a user would, to the node's entry.
        for folder in info["category"].split("/"):
            tree.locator(".p-tree-node-content").filter(has_text=re.compile(rf"^\s*{re.escape(folder)}\s*\d*\s*$")) \
                .first.click()
            page.wait_for_timeout(300)
        entry = tree.locator(".p-tree-node-content").filter(has_text=info["display_name"]).first
        entry.hover()
        entry.locator(".help-button").click()
        content = page.locator(".node-help-content")
        content.locator(".markdown-content, .fallback-content").first.wait_for(timeout=30_000)
        if content.locator(".fallback-content").count():
            problems.append(f"the help panel of {node_id} shows the frontend's fallback, not web/docs/{node_id}.md")
        shown = " ".join(content.inner_text().split())
        problems += [f"the help panel lacks {piece!r}" for piece in expected if " ".join(piece.split()) not in shown]
        panel_right = widen_sidebar(page)
        insets = page.evaluate(CHROME_INSETS_JS)
        page.evaluate(CENTER_NODE_JS, [node_id, {"top": insets["top"], "left": max(insets["left"], panel_right)}, 1.0])
        # Park the pointer on the empty middle of the menu bar, where it highlights nothing.
        page.mouse.move((panel_right + VIEWPORT["width"]) / 2, 10)
        page.wait_for_timeout(800)
        os.makedirs(OUT_DIR, exist_ok=True)
        out = os.path.join(OUT_DIR, HELP_PNG)
        page.screenshot(path=out)
    finally:
        context.close()
    print(f"{os.path.relpath(out, REPO)}: help of {node_id} ({len(expected)} pieces of its text checked)"
          + "".join(f"\n  problem: {p}" for p in problems))
    return problems


def widen_sidebar(page) -> float:
    """Drags the gutter between the sidebar and the canvas to HELP_PANEL_WIDTH; returns where the
    sidebar now ends (0 when there is no gutter)."""
    gutter = page.locator(".p-splitter-gutter").first
    box = gutter.bounding_box()
    if box is None:
        return 0.0
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(HELP_PANEL_WIDTH, y, steps=10)
    page.mouse.up()
    page.wait_for_timeout(300)
    box = gutter.bounding_box()
    return box["x"] + box["width"] if box else 0.0


def close_dialogs(page) -> list[str]:
    titles = page.evaluate(OPEN_DIALOGS_JS)
    for _ in titles:
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    return titles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflows to photograph (default: all in example_workflows/)")
    parser.add_argument("--help-page", nargs="?", const=HELP_NODE, metavar="NODE_ID",
                        help=f"also open this node's help page (default {HELP_NODE}) and write {HELP_PNG}; "
                             "alone, only that")
    args = parser.parse_args()
    help_node = args.help_page or (HELP_NODE if not args.names else None)
    comfyui = os.environ.get("COMFYUI_PATH", "").strip()
    if not comfyui or not os.path.isfile(os.path.join(comfyui, "main.py")):
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    paths = sorted(glob.glob(os.path.join(UI_DIR, "*.json")))
    if args.names:
        paths = [p for p in paths if os.path.splitext(os.path.basename(p))[0] in args.names]
    elif args.help_page:
        paths = []
    if not paths and not help_node:
        print("no workflows to photograph", file=sys.stderr)
        return 2

    from playwright.sync_api import sync_playwright

    base = tempfile.mkdtemp(prefix="comfyui-screenshots-")
    log_path = os.path.join(base, "server.log")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = None
    try:
        prepare_base_dir(base)
        server = start_server(os.path.abspath(comfyui), base, port, log_path)
        object_info = wait_for_server(server, url, log_path)
        needed = {n["type"] for p in paths for n in read_json(p)["nodes"]} - {"Note", "MarkdownNote"}
        needed |= {help_node} if help_node else set()
        unregistered = sorted(needed - set(object_info))
        if unregistered:
            print(f"the server does not know {unregistered}; its log:\n{tail(log_path)}", file=sys.stderr)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                problems = [p for path in paths for p in shoot(browser, url, path)]
                if help_node and help_node in object_info:
                    problems += check_help_over_http(url, object_info, help_node)
                    problems += shoot_help_page(browser, url, object_info, help_node)
            finally:
                browser.close()
        return 0 if not problems and not unregistered else 1
    finally:
        if server is not None:
            stop_server(server)
        link = os.path.join(base, "custom_nodes", PACK_LINK_NAME)
        if os.path.islink(link):
            os.unlink(link)  # before rmtree, so that nothing can reach through it into the repository
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
