"""An example or two under each command's --help (click's epilog), and the exit codes
under `appliance --help`: what an operator types, as they type it. tests/test_operator_flows.py
parses every example against its command, so an example never names a flag that is gone."""

from __future__ import annotations

import click

EXIT_CODES = (
    "Exit status: 0 done; 1 failed (one line on stderr: what, and how to fix it); "
    "2 usage error (a flag, an argument); 3 done, but the answer is no (status: not every "
    "model ready; plan: a replica cannot be placed; images build: no Python for the image). "
    'With --json, stdout holds JSON only on success. docs/operations.md "The command line".'
)

EXAMPLES: dict[str, list[str]] = {
    "": [
        "appliance serve --config /etc/appliance/appliance.toml",
        "appliance status --json",
        "appliance keys create --name ci",
    ],
    "serve": ["appliance serve", "appliance serve --config ./appliance.toml --port 8080"],
    "check": ["appliance check --config /etc/appliance/appliance.toml", "appliance check --wait-ready 300"],
    "status": ["appliance status", "appliance status --json"],
    "ps": ["appliance ps", "appliance ps --json"],
    "plan": ["appliance plan", "appliance plan --inventory box.toml --json"],
    "reload": ["appliance reload", "appliance reload --no-wait --json"],
    "scale": ["appliance scale smollm2-135m-instruct 2", "appliance scale smollm2-135m-instruct auto"],
    "load": ["appliance load smollm2-135m-instruct"],
    "unload": ["appliance unload smollm2-135m-instruct"],
    "pin": ["appliance pin smollm2-135m-instruct"],
    "unpin": ["appliance unpin smollm2-135m-instruct"],
    "restart": ["appliance restart smollm2-135m-instruct#0"],
    "drain": ["appliance drain smollm2-135m-instruct#1 --json"],
    "tui": ["appliance tui", "appliance tui --url http://10.0.0.5:8000 --token-file admin.token"],
    "logs": ["appliance logs -n 100 --no-follow", "appliance logs --replica smollm2-135m-instruct#0"],
    "export": ["appliance export llama-70b --to vllm-multinode -o deploy/", "appliance export llama-8b --to kserve"],
    "audit": ["appliance audit export --since 2026-01-01 --format csv -o audit.csv"],
    "audit export": ["appliance audit export --since 2026-01-01 --format csv -o audit.csv"],
    "bundle": ["appliance bundle create -o appliance.tar"],
    "bundle create": ["appliance bundle create -o appliance.tar", "appliance bundle create -o a.tar --model NAME"],
    "keys": [
        "appliance keys create --name ci",
        "appliance keys ls",
        "appliance keys set KEY_ID --budget-tokens 500000",
        "appliance keys revoke KEY_ID",
    ],
    "keys create": ["appliance keys create --name ci", "appliance keys create --name app --route r1 --rpm 60 --json"],
    "keys ls": ["appliance keys ls", "appliance keys ls --json"],
    "keys set": [
        "appliance keys set 3f2a9c1b7d4e --budget-tokens 2000000 --budget-period month",
        "appliance keys set 3f2a9c1b7d4e --rpm 0",
    ],
    "keys revoke": ["appliance keys revoke 3f2a9c1b7d4e"],
    "models": ["appliance models ls", "appliance models import /media/usb/Qwen2.5-7B --name qwen2.5-7b"],
    "models ls": ["appliance models ls", "appliance models ls --json"],
    "models import": [
        "appliance models import /media/usb/Qwen2.5-7B --name qwen2.5-7b",
        "appliance models import model.gguf --license MIT",
    ],
    "models pull": ["appliance models pull Qwen/Qwen2.5-7B-Instruct --name qwen2.5-7b"],
    "models verify": ["appliance models verify", "appliance models verify qwen2.5-7b --json"],
    "models rm": ["appliance models rm qwen2.5-7b"],
    "models accept-license": ["appliance models accept-license llama-3.1-8b --by 'J. Doe'"],
    "models protect": ["appliance models protect qwen2.5-7b"],
    "models unprotect": ["appliance models unprotect qwen2.5-7b"],
    "models pin": ["appliance models pin qwen2.5-7b"],
    "models unpin": ["appliance models unpin qwen2.5-7b"],
    "images": ["appliance images ls", "appliance images build llamacpp"],
    "images build": ["appliance images build llamacpp", "appliance images build vllm --python /usr/bin/python3.12"],
    "images ls": ["appliance images ls --json"],
    "images rm": ["appliance images rm vllm 0.6.3-1a2b3c4d5e6f"],
    "images rollback": ["appliance images rollback vllm"],
    "images verify": ["appliance images verify", "appliance images verify llamacpp"],
}


def add_examples(group: click.Group, path: str = "") -> None:
    """Each command's examples as its epilog (unwrapped: one command a line); the group
    `appliance` itself also gets the exit codes."""
    lines = EXAMPLES.get(path, [])
    if lines:
        group_epilog = "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)
        group.epilog = group_epilog + (f"\n\n{EXIT_CODES}" if not path else "")
    for name, command in group.commands.items() if isinstance(group, click.Group) else ():
        add_examples(command, f"{path} {name}".strip())  # type: ignore[arg-type]
