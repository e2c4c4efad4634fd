"""MkDocs hook: publish benchmarks/ on the site without copying it into docs/.

- benchmarks/README.md (how to run each script) becomes the page `benchmark-scripts.md`;
- benchmarks/results/ (the dated measurement logs and their charts) becomes `results/`.

So docs/benchmarks.md links them as `benchmark-scripts.md` and `results/NAME.md`, and `mkdocs build --strict`
checks those links and every link inside them. The files stay beside the scripts that made them.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def on_files(files, config):
    files.append(File.generated(config, "benchmark-scripts.md", abs_src_path=str(BENCHMARKS / "README.md")))
    for path in sorted((BENCHMARKS / "results").iterdir()):
        if path.is_file() and path.suffix in {".md", ".png", ".json"}:
            # linked from docs/benchmarks.md and benchmark-scripts.md rather than listed in the navigation
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path),
                                        inclusion=InclusionLevel.NOT_IN_NAV))
    return files
