"""`minilars models [list|pull]`: the model families that load, and the model cache."""
from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("models", help="list the model families that load and the named models; download one")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    pull = actions.add_parser("pull", help="fetch a named model into the user cache (a no-op when cached)")
    pull.add_argument("name", help="model name, e.g. smollm2-135m")
    pull.set_defaults(func=run_pull)
    listing = actions.add_parser("list", help="list the model families that load and the named models "
                                              "(the default action)")
    listing.set_defaults(func=run_list)
    parser.set_defaults(func=run_list)


def run_pull(args) -> int:
    from minilars.models import pull

    path = pull(args.name)
    print(path)
    return 0


def run_list(args) -> int:
    from minilars.models import MODELS, cache_dir
    from minilars.models.families import FAMILIES

    print("families (Hugging Face directory: config.json model_type; GGUF: general.architecture):")
    for fam in FAMILIES.values():
        gguf = ", ".join(fam.gguf_architectures) or "written as llama by llama.cpp"
        print(f"  {fam.name:8s} model_type {', '.join(fam.hf_model_types):12s} GGUF {gguf:30s} {fam.adds}")
    print("named models (minilars models pull NAME):")
    for name, source in MODELS.items():
        path = cache_dir() / source.filename
        print(f"  {name:16s} {'cached  ' + str(path) if path.is_file() else 'not cached'}")
    return 0
