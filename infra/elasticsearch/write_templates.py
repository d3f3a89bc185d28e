"""Write the composable index template of every projection to templates/.

The templates are derived from each projection's CollectionSchema, the same
mapping the Elasticsearch read store creates its indices with;
tests/infra/test_es_templates.py fails when the files drift from the code.

    python infra/elasticsearch/write_templates.py [--prefix orderstream-]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orderstream.readstore.elasticsearch import index_template
from projections.registry import ALL_PROJECTIONS

HERE = Path(__file__).resolve().parent / "templates"


def render(prefix: str) -> dict[str, str]:
    return {
        f"{p.schema.name}.json": json.dumps(index_template(p.schema, prefix), indent=2, sort_keys=True) + "\n"
        for p in ALL_PROJECTIONS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefix", default="orderstream-")
    args = parser.parse_args()
    HERE.mkdir(exist_ok=True)
    for name, text in render(args.prefix).items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
