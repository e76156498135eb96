"""The ``helios`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from helios.cli_options import add_engine_arguments, engine_options


def _generate(args: argparse.Namespace) -> int:
    from helios import LLM, SamplingParams

    llm = LLM(**engine_options(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    use_chat = not args.no_chat and llm.tokenizer is not None and bool(llm.tokenizer.chat_template)
    prompts = [[{"role": "user", "content": p}] if use_chat else p for p in args.prompts]
    for out in llm.generate(prompts, params):
        print(out.text.strip())
        if args.show_exits:
            print(f"[exit layers: {out.exit_layers}]", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Ray lives outside the engine: import the serving side only for this command
    from controller import serve as slo_serve
    from deployments.config import load_config, parse_config
    from deployments.run import serve_forever

    if args.config and slo_serve.is_slo_file(args.config):  # an SLO file: the HELIOS controller chooses
        slo_serve.serve_forever(args.config, args.host, args.port)
        return 0
    # no config: the default model, with every local CPU (a laptop serving one model)
    config = load_config(args.config) if args.config else parse_config({"models": [{"num_cpus": os.cpu_count()}]})
    if args.host or args.port:
        http = config.http.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
        config = config.model_copy(update={"http": http})
    serve_forever(config)
    return 0


def _ee_tune(args: argparse.Namespace) -> int:
    from helios.tuning.ee_tune_command import run_ee_tune

    args.dataset = args.dataset or args.default_train
    args.heldout = args.heldout or args.default_heldout
    args.command_line = "helios " + " ".join(sys.argv[1:])
    return run_ee_tune(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helios", description="Serve and run early-exit LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate replies to prompts and print them")
    gen.add_argument("prompts", nargs="+")
    add_engine_arguments(gen)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat", action="store_true", help="send prompts as raw text, without the chat template")
    gen.add_argument("--show-exits", action="store_true", help="print each token's exit layer to stderr")
    gen.set_defaults(func=_generate)
    tune = commands.add_parser("ee-tune", help="train and calibrate exit heads on a frozen model")
    from helios.tuning.ee_tune_command import add_arguments as add_tune_arguments

    add_tune_arguments(tune)
    tune.set_defaults(func=_ee_tune)
    from helios.tuning.length_tune_command import add_arguments as add_length_tune_arguments
    add_length_tune_arguments(commands.add_parser("length-tune", help="train a response-length head on the model's own answers"))
    from helios.models_command import add_parser as add_models_parser

    add_models_parser(commands)
    from controller.profile_command import add_arguments as add_profile_arguments
    add_profile_arguments(commands.add_parser("profile", help="measure an SLO file's candidates: the model repository"))
    srv = commands.add_parser("serve", help="serve models over OpenAI-compatible HTTP on Ray Serve")
    srv.add_argument("config", nargs="?", help="YAML serving config, or an SLO file (top-level `candidates`: the "
                     "controller chooses model and depth); default: the default model on 127.0.0.1:8000")
    srv.add_argument("--host", default=None, help="override http.host")
    srv.add_argument("--port", type=int, default=None, help="override http.port")
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:  # bad input: one clear line, no traceback
        print(f"helios: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
