"""Open ``vmsnap report``'s page in headless Chromium (Debian's ``chromium``): its DOM as the browser built
it, and a screenshot of it; and check that every image the page references exists, and the other way round."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def chromium() -> str:
    found = shutil.which("chromium")
    assert found is not None, "chromium is not installed (scripts/packages.d/boot.txt)"
    return found


def open_page(page: Path, screenshot: Path) -> str:
    """The DOM Chromium built from ``page``; its screenshot goes to ``screenshot``."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        url = page.resolve().as_uri()
        common = [chromium(), *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1800"]
        shot = subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
        assert screenshot.is_file(), shot.stderr.decode(errors="replace")[-2000:]
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        common = [chromium(), *FLAGS, f"--user-data-dir={profile}"]
        dump = subprocess.run([*common, "--dump-dom", url], capture_output=True, timeout=180, text=True)
    assert dump.returncode == 0, dump.stderr[-2000:]
    return dump.stdout


def blank(png: bytes) -> bool:
    """True when every pixel of the PNG has the same colour."""
    import matplotlib.image

    return bool(matplotlib.image.imread(io.BytesIO(png), format="png").std() == 0)


def check_images(page: Path) -> list[str]:
    """Every image the page references exists, and every image written beside it is referenced; returns the
    references."""
    text = page.read_text()
    sources = re.findall(r"<img[^>]* src='([^']+)'", text)
    for source in sources:
        assert (page.parent / source).is_file(), f"{source} is referenced but missing"
    written = {str(p.relative_to(page.parent)) for p in page.parent.rglob("*.png")}
    assert written == set(sources), f"written but not referenced: {written - set(sources)}"
    return sources
