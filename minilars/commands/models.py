"""`minilars models pull|list`: the model cache."""
from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("models", help="download and list cached models")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    pull = actions.add_parser("pull", help="fetch a named model into the user cache (a no-op when cached)")
    pull.add_argument("name", help="model name, e.g. smollm2-135m")
    pull.set_defaults(func=run_pull)
    listing = actions.add_parser("list", help="list the named models and whether they are cached")
    listing.set_defaults(func=run_list)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_pull(args) -> int:
    from minilars.models import pull

    path = pull(args.name)
    print(path)
    return 0


def run_list(args) -> int:
    from minilars.models import MODELS, cache_dir

    for name, source in MODELS.items():
        path = cache_dir() / source.filename
        print(f"{name:16s} {'cached  ' + str(path) if path.is_file() else 'not cached'}")
    return 0
