"""The ``helios`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from helios.config import DTYPES
from helios.exits import CONFIDENCE_MEASURES, EXIT_POLICIES
from helios.loader import DEFAULT_MODEL


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine options shared by commands that build an engine."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, Hugging Face folder or GGUF file")
    parser.add_argument("--max-layers", type=int, default=None, help="load only this many layers")
    parser.add_argument("--exit-policy", default="none", choices=EXIT_POLICIES)
    parser.add_argument("--exit-layers", type=int_list, default=[], help="exit points, e.g. 6,12,18,24")
    parser.add_argument("--exit-threshold", type=float, default=0.9)
    parser.add_argument("--confidence", default=None, choices=CONFIDENCE_MEASURES,
                        help="default: the exit heads' own measure, else max_prob")
    parser.add_argument("--exit-target", type=float, default=None,
                        help="token agreement the tuned heads' thresholds were calibrated for (e.g. 0.95)")
    parser.add_argument("--exit-heads", default=None, help="folder of tuned exit heads, or a shipped name (smollm2-135m)")
    parser.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="bytes of KV cache")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto: bfloat16 on GPU, and on CPUs with bf16 matmuls for GGUF/half checkpoints")


def engine_options(args: argparse.Namespace) -> dict:
    return dict(max_layers=args.max_layers, exit_policy=args.exit_policy, exit_layers=args.exit_layers,
                exit_threshold=args.exit_threshold, confidence=args.confidence, exit_heads=args.exit_heads,
                exit_target=args.exit_target,
                kv_cache_memory=args.kv_cache_memory, device=args.device, dtype=args.dtype)


def _generate(args: argparse.Namespace) -> int:
    from helios import LLM, SamplingParams

    llm = LLM(args.model, **engine_options(args))
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
    from deployments.config import load_config, parse_config
    from deployments.run import serve_forever

    # no config: the default model, with every local CPU (a laptop serving one model)
    config = load_config(args.config) if args.config else parse_config({"models": [{"num_cpus": os.cpu_count()}]})
    if args.host or args.port:
        http = config.http.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
        config = config.model_copy(update={"http": http})
    serve_forever(config)
    return 0


def _ee_tune(args: argparse.Namespace) -> int:
    from helios.ee_tune_command import run_ee_tune

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
    from helios.ee_tune_command import add_arguments as add_tune_arguments

    add_tune_arguments(tune)
    tune.set_defaults(func=_ee_tune)
    from helios.models_command import add_parser as add_models_parser

    add_models_parser(commands)
    srv = commands.add_parser("serve", help="serve models over OpenAI-compatible HTTP on Ray Serve")
    srv.add_argument("config", nargs="?", help="YAML serving config (default: the default model on 127.0.0.1:8000)")
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
