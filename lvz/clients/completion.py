"""``lvz completion bash|zsh``: a completion script generated from the argument parser itself.

Generated rather than written by hand so that it can never disagree with the commands, and
without a dependency (shtab would do the same walk): the parser's tree of subcommands and
options becomes two tables, and one small shell function walks the words typed so far through
them. zsh runs the same function through its ``bashcompinit`` layer.

Positional arguments complete by their metavar: a ``VM`` by asking the daemon at completion
time (``lvz _vm-names``, the ``--socket`` typed on the line honoured; nothing at all when no
daemon answers within 2 s), a ``REG`` / ``GROUP`` / ``ATTR`` / ``TYPE`` from the public
constants. VM names come from other clients, so they are matched with ``[[ == ]]`` rather than
handed to ``compgen -W``, which would expand ``$(…)`` in them.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator

__all__ = ["script", "tree", "value_options", "positional_kinds", "static_words"]

#: What a positional argument completes to, by its metavar ("vm": names from the daemon).
KINDS = {
    "VM": "vm",
    "REG": "reg",
    "GROUP": "group",
    "ATTR": "attr",
    "TYPE": "device",
    "DEVICE": "device",
}


def tree(
    parser: argparse.ArgumentParser, path: str = "lvz"
) -> dict[str, tuple[list[str], list[str]]]:
    """``{"lvz vm create": (subcommands, options)}`` for every command path."""
    subs: list[str] = []
    opts: list[str] = []
    out: dict[str, tuple[list[str], list[str]]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if name.startswith("_"):
                    continue  # internal (`lvz _vm-names`): never offered
                subs.append(name)
                out.update(tree(child, f"{path} {name}"))
        elif action.option_strings:
            opts.extend(o for o in action.option_strings if o.startswith("--"))
        elif action.choices:
            subs.extend(str(c) for c in action.choices)  # e.g. `completion bash|zsh`
    out[path] = (subs, opts)
    return out


def _walk(
    parser: argparse.ArgumentParser, path: str = "lvz"
) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")


def value_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every option that takes a value: its value is not a positional argument."""
    return sorted(
        {
            o
            for _path, a in _walk(parser)
            if a.option_strings and a.nargs != 0
            for o in a.option_strings
        }
    )


def positional_kinds(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{"lvz vm info 0": "vm"}``: what the Nth positional of a command completes to."""
    out: dict[str, str] = {}
    counts: dict[str, int] = {}
    for path, action in _walk(parser):
        if action.option_strings or isinstance(action, argparse._SubParsersAction):
            continue
        n = counts[path] = counts.get(path, 0) + 1
        kind = KINDS.get(str(action.metavar))
        if kind is not None:
            out[f"{path} {n - 1}"] = kind
    return out


def static_words() -> dict[str, list[str]]:
    """The constant word lists: register, attribute group and attr names, device types."""
    from .cli import SHORT_DEVICES, attr_names, register_names

    return {
        "reg": [*sorted(register_names()), "csr:", "cpucfg:"],
        "group": sorted(n for n in attr_names("group") if not n.startswith("kvm_")),
        "attr": sorted(n for n in attr_names("attr") if not n.startswith("kvm_")),
        "device": sorted(SHORT_DEVICES),
    }


_FUNCTION = r"""
_lvz_vm_names() {
    local sock=() i name
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            --socket) sock=(--socket "${COMP_WORDS[i + 1]}") ;;
            --socket=*) sock=("${COMP_WORDS[i]}") ;;
        esac
    done
    while IFS= read -r name; do
        [[ "$name" == "$cur"* ]] && COMPREPLY+=("$name")
    done < <(timeout 2 "${COMP_WORDS[0]}" _vm-names "${sock[@]}" 2>/dev/null)
}

_lvz() {
    local cur="${COMP_WORDS[COMP_CWORD]}" path="lvz" word i npos=0 value=0 kind
    COMPREPLY=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${COMP_WORDS[i]}"
        if ((value)); then
            value=0
            continue
        fi
        if [[ "$word" == -* ]]; then
            [[ " $_lvz_valopts " == *" $word "* ]] && value=1
            continue
        fi
        if [[ -n "${_lvz_subs["$path $word"]+set}" ]]; then
            path="$path $word"
            npos=0
        else
            npos=$((npos + 1))
        fi
    done
    kind="${_lvz_args["$path $npos"]}"
    if ((value)); then
        COMPREPLY=($(compgen -f -- "$cur"))
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "${_lvz_opts["$path"]}" -- "$cur"))
    elif [[ -n "${_lvz_subs["$path"]}" ]]; then
        COMPREPLY=($(compgen -W "${_lvz_subs["$path"]}" -- "$cur"))
    elif [[ "$kind" == vm ]]; then
        _lvz_vm_names
    elif [[ -n "$kind" ]]; then
        COMPREPLY=($(compgen -W "${_lvz_words["$kind"]}" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}
complete -F _lvz lvz
"""


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    paths = tree(parser)
    lines = [f"# {shell} completion for lvz, generated by `lvz completion {shell}`"]
    if shell == "zsh":
        lines += ["autoload -U +X bashcompinit && bashcompinit"]
    lines += ["typeset -A _lvz_subs _lvz_opts _lvz_args _lvz_words"]
    for path, (subs, opts) in sorted(paths.items()):
        key = shlex.quote(path)
        lines.append(f"_lvz_subs[{key}]={shlex.quote(' '.join(subs))}")
        lines.append(f"_lvz_opts[{key}]={shlex.quote(' '.join(opts))}")
    for where, kind in sorted(positional_kinds(parser).items()):
        lines.append(f"_lvz_args[{shlex.quote(where)}]={kind}")
    for kind, words in sorted(static_words().items()):
        lines.append(f"_lvz_words[{kind}]={shlex.quote(' '.join(words))}")
    lines.append(f"_lvz_valopts={shlex.quote(' '.join(value_options(parser)))}")
    return "\n".join(lines) + "\n" + _FUNCTION.lstrip("\n")
