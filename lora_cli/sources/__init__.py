"""Training data from one or several sources: local files, globs, folders of shards, `datasets.save_to_disk`
folders and Hub datasets, each with an optional weight, mixed reproducibly under --seed.

    a.jsonl                                  one file: read exactly as lora_cli always has
    a.jsonl:0.7,org/ds:train:0.3             a weighted mixture (weights are shares of the mixture)
    mix.yaml                                 a YAML list of {path, name, split, revision, weight, limit}

spec.py parses a spec, read.py yields each source's rows with where they came from (`file:line`, `source:row N`),
mixture.py normalises them into an Arrow table on disk and picks each source's share.
"""

from .mixture import Mixture, load, pick, report
from .read import fingerprint, scan
from .spec import Source, parse, problem
from .stream import stream

__all__ = ["Mixture", "Source", "fingerprint", "load", "parse", "pick", "problem", "report", "scan", "stream"]
