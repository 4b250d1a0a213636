"""What [server] trusted_proxies costs the front door per request: the baseline tree, this
tree without the list, and this tree with it, each request sent through a proxy (its
X-Forwarded-For: "203.0.113.9, 10.1.2.3", the peer 127.0.0.1).

    python bench/trusted_proxies.py --baseline /work/base-6a1c645 [--requests 3000] [--batches 5] [--rounds 3]

bench/front_door_python.py's measurement (the front door in process, the engine's answer
canned), in a fresh process per side and round, the sides' order rotating each round. The
"with" side lists 127.0.0.1 and 10.0.0.0/8: the client is 203.0.113.9 and its row names the
proxy. Its config skips validation, as keys.required would refuse the bench's keyless
requests (a listed proxy requires keys: appliance/config/validation.bind_error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
XFF = (b"x-forwarded-for", b"203.0.113.9, 10.1.2.3")
PROXIES = ["127.0.0.1", "10.0.0.0/8"]

sys.path.insert(0, str(HERE))
from alternate import alternate, free_port, load_line  # noqa: E402


def measure(tree: str, listed: bool, port: int, requests: int, batches: int) -> dict:
    sys.path.insert(0, tree)
    sys.path.insert(1, str(HERE))
    import front_door_python as fdp
    import msgspec

    import appliance.config

    fdp.HEADERS = [*fdp.HEADERS, XFF]  # every side is sent the header; only "with" reads it
    if listed:
        parse = appliance.config.parse_config

        def with_proxies(text: str):
            cfg = parse(text)
            return msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, trusted_proxies=PROXIES))

        appliance.config.parse_config = with_proxies
    return fdp.measure(tree, port, requests, batches)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--_measure"]:
        tree, listed, port, requests, batches = argv[1], argv[2] == "1", int(argv[3]), int(argv[4]), int(argv[5])
        print(json.dumps(measure(tree, listed, port, requests, batches)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="the tree before trusted_proxies (e.g. /work/base-6a1c645)")
    p.add_argument("--requests", type=int, default=3000, help="requests per batch (default 3000)")
    p.add_argument("--batches", type=int, default=5, help="batches per round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each side, the order rotating (default 3)")
    args = p.parse_args(argv)
    port = free_port()
    measured = [str(port), str(args.requests), str(args.batches)]
    sides = [("base", [__file__, "--_measure", args.baseline, "0", *measured]),
             ("without", [__file__, "--_measure", str(ROOT), "0", *measured]),
             ("with", [__file__, "--_measure", str(ROOT), "1", *measured])]
    med = alternate(sides, args.rounds, port)
    print(load_line(args.rounds, args.batches, args.requests, args.baseline))
    print(f"{'side':<7} | {'us/req min':>10} | {'us/req med':>10} | {'calls/req':>9}")
    for side, m in med.items():
        print(f"{side:<7} | {m['min']:>10.1f} | {m['median']:>10.1f} | {m['calls']:>9.1f}")
    b, wo, w = med["base"], med["without"], med["with"]
    print(f"without/base: us/req min {wo['min'] / b['min']:.3f}, median {wo['median'] / b['median']:.3f}, "
          f"calls {wo['calls'] / b['calls']:.3f}")
    print(f"with/without: us/req min {w['min'] / wo['min']:.3f}, median {w['median'] / wo['median']:.3f}, "
          f"calls {w['calls'] / wo['calls']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
