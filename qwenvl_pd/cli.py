"""`qwenvl-pd <command>`: argparse -> frozen configs -> the command's main()."""
import argparse
import sys

ROLES_PENDING = ("proxy", "prefill", "decode", "serve")


def _make_tiny(args: argparse.Namespace) -> int:
    from qwenvl_pd.model.tiny import make_tiny
    path = make_tiny(args.arch, args.out, seed=args.seed)
    print(f"wrote a tiny {args.arch} checkpoint with RANDOM weights to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from qwenvl_pd import LLM, SamplingParams
    from PIL import Image
    llm = LLM(model=args.model, max_model_len=args.max_model_len)
    images = [Image.open(p) for p in args.image]
    pads = "<|vision_start|><|image_pad|><|vision_end|>" * len(images)
    prompt = f"<|im_start|>user\n{pads}{args.prompt}<|im_end|>\n<|im_start|>assistant\n"
    request = {"prompt": prompt, "multi_modal_data": {"image": images} if images else {}}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    print(llm.generate([request], params)[0].outputs[0].text)
    return 0


def _pending(args: argparse.Namespace) -> int:
    print(f"qwenvl-pd {args.command}: not available in this build yet", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl-pd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint in HF format")
    tiny.add_argument("--arch", required=True, choices=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny)
    gen = sub.add_parser("generate", help="one offline chat completion (text and images)")
    gen.add_argument("--model", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", action="append", default=[])
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--max-model-len", type=int, default=8192)
    gen.set_defaults(func=_generate)
    for role in ROLES_PENDING:
        sub.add_parser(role, help=f"run the {role} role").set_defaults(func=_pending)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # the project's errors carry a complete message; a traceback would only bury it
        print(f"qwenvl-pd {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
