"""`qlora-lab generate`: answer prompts with base + adapter (unmerged) or a merged model.

The prompt is rendered by `data.render_prompt`, the same function training used, so the model sees
at inference exactly the format it was trained on. A prompt longer than the model's context
(`max_position_embeddings`) is refused, and `--max-new-tokens` is cut to the room left: past that
length transformers only warns, and the model continues at positions it was never trained on.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lab import adapters, models, safety
from qlora_lab.config import ModelConfig, QuantConfig
from qlora_lab.data import render_prompt, resolve_template
from qlora_lab.errors import UserError
from qlora_lab.sources import first_line

log = logging.getLogger(__name__)


MIN_TEMPERATURE = 0.01  # and 0, greedy
MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class GenerateConfig:
    """adapter: a run's output dir or adapter dir. model_dir: a merged model (from `merge`).
    model: the base, for a bare model run or to override the adapter's recorded base.
    temperature: 0 = greedy (deterministic); otherwise in [0.01, 100], sampling with top_p.
    seed: seeds torch for sampling; [0, 2**32 - 1], the range train.seed allows.
    allow_pickle: accept pickle weights (.bin) where safetensors are missing; they can run code.
    trust_remote_code: let a base recorded with trust_remote_code run its repo's code.
    """

    adapter: str | None = None
    model_dir: str | None = None
    model: str | None = None
    prompt: str | None = None
    prompt_file: str | None = None
    chat: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int = 0
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be a positive integer")
        # NaN fails every comparison, so a range check must be written to fail it. Logits over
        # a temperature below ~1e-38 overflow fp32 to inf and sampling crashed on NaN
        # probabilities; above 100 every token is about equally likely: noise, not an answer.
        if not (self.temperature == 0
                or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise UserError(f"--temperature {self.temperature} must be 0 (greedy) or between "
                            f"{MIN_TEMPERATURE} and {MAX_TEMPERATURE:g} (1 samples the model "
                            "as trained)")
        # torch.manual_seed overflows past 64 bits; train's seed range keeps the two alike.
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed {self.seed} must be an integer in [0, 2**32 - 1]")
        if sum(x is not None for x in (self.adapter, self.model_dir)) > 1:
            raise UserError("pass either --adapter or --model-dir, not both")
        if self.model_dir is not None and self.model is not None:
            # A merged dir is base and adapter in one: there is no base for --model to replace.
            raise UserError("--model-dir is a whole model: pass it without --model")
        if self.adapter is None and self.model_dir is None and self.model is None:
            raise UserError("nothing to run — pass --adapter DIR (a trained run), --model-dir "
                            "DIR (a merged model) or --model NAME (a base model)")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    template: str
    device: str


def load_for_inference(cfg: GenerateConfig) -> LoadedModel:
    device = models.resolve_device(cfg.device)
    if cfg.adapter:
        ref = adapters.resolve_adapter(cfg.adapter, cfg.model, allow_pickle=cfg.allow_pickle,
                                       trust_remote_code=cfg.trust_remote_code)
        model, tokenizer, _ = adapters.load_adapter_model(ref, device)
        template = ref.template
    else:
        name = cfg.model_dir or cfg.model
        if cfg.model_dir and not (Path(cfg.model_dir) / "config.json").is_file():
            raise UserError(f"model dir {cfg.model_dir} has no config.json — pass a folder "
                            "written by `qlora-lab merge`")
        path = models.resolve_model_path(name)
        safety.require_safetensors(Path(path), "model dir", cfg.allow_pickle)
        info = adapters.read_base_info(Path(path)) if cfg.model_dir else {}
        # A merged model is already dense; a bare base is loaded in 4-bit like training would.
        quant = QuantConfig(bits=16) if cfg.model_dir else QuantConfig()
        model_cfg = ModelConfig(name=name, trust_remote_code=cfg.trust_remote_code,
                                allow_pickle=cfg.allow_pickle)
        with adapters.explain_load_errors(f"model {name}", "pass a folder written by "
                                          "`qlora-lab merge` or save_pretrained"):
            model = models.load_base_model(path, model_cfg, quant, device)
            tokenizer = models.load_tokenizer(path, cfg.trust_remote_code)
        model.eval()
        template = info.get("template", "auto")
    return LoadedModel(model, tokenizer, resolve_template(template, tokenizer), device)


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def model_context(model_config) -> int | None:
    """The most tokens the model reads (`max_position_embeddings`); None if its config says not.
    `generate` and `eval` both hold prompts to it."""
    limit = getattr(model_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def fit_new_tokens(model_config, prompt_tokens: int, max_new_tokens: int) -> int:
    """New tokens that fit after the prompt in the model's context (at most `max_new_tokens`)."""
    limit = model_context(model_config)
    if limit is None:
        return max_new_tokens  # the config states no limit; trust the caller
    if prompt_tokens >= limit:
        raise UserError(f"the prompt is {prompt_tokens} tokens, but the model reads at most "
                        f"{limit} (max_position_embeddings) — shorten it (in --chat, /reset "
                        "clears the history)")
    if max_new_tokens > limit - prompt_tokens:
        log.warning("the prompt is %d tokens of the model's %d, so --max-new-tokens %d is cut to "
                    "%d", prompt_tokens, limit, max_new_tokens, limit - prompt_tokens)
        return limit - prompt_tokens
    return max_new_tokens


def template_source(tokenizer) -> str:
    """The tokenizer's chat template, named by the file it was read from, for errors that point
    at the file to fix (`generate` and `eval`)."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            return f"the chat template in {folder / name}"
    return f"the chat template of tokenizer {tokenizer.name_or_path}"


def render_chat(loaded: LoadedModel, messages: list[dict]) -> str:
    """The prompt text; a broken chat template is the user's file to fix, not a traceback."""
    from jinja2 import TemplateError

    try:
        return render_prompt(messages, loaded.tokenizer, loaded.template,
                             add_generation_prompt=True)
    except TemplateError as exc:  # a syntax error, or the template's own raise_exception()
        raise UserError(f"{template_source(loaded.tokenizer)} cannot render the "
                        f"prompt ({first_line(exc)}) — fix the template, or restore the base "
                        "model's copy") from None


@torch.inference_mode()
def generate_reply(loaded: LoadedModel, messages: list[dict], cfg: GenerateConfig,
                   streamer=None) -> str:
    tok = loaded.tokenizer
    text = render_chat(loaded, messages)
    enc = tok(text, add_special_tokens=False, return_tensors="pt").to(loaded.model.device)
    max_new_tokens = fit_new_tokens(loaded.model.config, enc["input_ids"].shape[1],
                                    cfg.max_new_tokens)
    sampling = cfg.temperature > 0
    if sampling:
        torch.manual_seed(cfg.seed)
    out = loaded.model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=sampling,
        temperature=cfg.temperature if sampling else None, top_p=cfg.top_p if sampling else None,
        top_k=None, eos_token_id=stop_token_ids(loaded), pad_token_id=tok.pad_token_id,
        use_cache=True, streamer=streamer)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def read_prompt(cfg: GenerateConfig) -> str:
    if cfg.prompt is not None:
        prompt = cfg.prompt
    elif cfg.prompt_file is not None:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise UserError(f"prompt file {path} does not exist — pass an existing text file")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"prompt file {path} is not UTF-8 text — re-save it as UTF-8") from None
    else:
        prompt = _read_stdin()
    if cfg.prompt is not None:
        require_utf8(prompt, "--prompt")
    if not prompt.strip():
        raise UserError("the prompt is empty — give some text to answer")
    return prompt.strip()


def require_utf8(text: str, what: str) -> None:
    """Refuse text holding lone surrogates, which no tokenizer can encode.

    Python decodes argv, and stdin under a C/POSIX locale, with surrogateescape: bytes that are
    not UTF-8 arrive as lone surrogates instead of raising UnicodeDecodeError.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} is not UTF-8 text — re-encode it as UTF-8") from None


def _stdin_open() -> bool:
    # sys.stdin is None when fd 0 was closed before Python started (`generate <&-`); a closed
    # stream object raises ValueError on any use.
    return sys.stdin is not None and not sys.stdin.closed


def _read_stdin() -> str:
    """The prompt piped on stdin; a terminal, a closed stdin and an empty one mean "no prompt"."""
    try:
        text = "" if not _stdin_open() or sys.stdin.isatty() else sys.stdin.read()
    except UnicodeDecodeError:
        raise UserError("the prompt on stdin is not UTF-8 text — re-encode it as UTF-8") from None
    except (OSError, ValueError):
        text = ""  # fd 0 closed under a live sys.stdin: EBADF
    require_utf8(text, "the prompt on stdin")
    if not text.strip():
        raise UserError("no prompt (stdin is a terminal, closed or empty) — pass --prompt TEXT, "
                        "--prompt-file F, pipe text on stdin, or use --chat")
    return text


def _read_line(prompt: str) -> str | None:
    """One line typed in the chat; None at the end of input (Ctrl-D, a closed or empty stdin)."""
    if not _stdin_open():
        return None
    try:
        return input(prompt)
    except (EOFError, OSError, ValueError):
        return None


def chat_loop(loaded: LoadedModel, cfg: GenerateConfig) -> None:
    """Interactive multi-turn chat; tokens stream as they are generated."""
    from transformers import TextStreamer

    # Under a UTF-8 locale stdin decodes strictly, and input() would end the chat on a bad byte
    # as if at EOF (UnicodeDecodeError is a ValueError); escaped, it is one refused message.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    history: list[dict] = []
    print("chat: type a message; /reset clears the history, /exit or Ctrl-D quits", flush=True)
    while True:
        line = _read_line("you> ")
        if line is None:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        try:
            require_utf8(line, "the message")
        except UserError as exc:  # one bad line: say so, keep the session
            print(f"error: {exc}", file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            reply = generate_reply(loaded, history, cfg, streamer=streamer)
        except UserError as exc:  # the history outgrew the context, or the template refused
            # it: say so, keep the session
            history.pop()
            print(f"\nerror: {exc}", file=sys.stderr, flush=True)
            continue
        history.append({"role": "assistant", "content": reply})


def run_generate(cfg: GenerateConfig) -> str | None:
    """Print (and return) the answer to one prompt, or run the interactive chat."""
    prompt = None if cfg.chat else read_prompt(cfg)
    if cfg.chat and not _stdin_open():
        log.warning("stdin is closed, so there is nothing to chat about; exiting")
        return None  # like Ctrl-D at the first prompt, without loading a model for nothing
    loaded = load_for_inference(cfg)
    if cfg.chat:
        chat_loop(loaded, cfg)
        return None
    reply = generate_reply(loaded, [{"role": "user", "content": prompt}], cfg)
    print(reply, flush=True)
    return reply
