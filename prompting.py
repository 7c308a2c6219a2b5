"""The pool's text prompts: built from the tables in prompts/ (the default), eight templates, a
file of one's own (--prompts), or descriptions a language model writes first (--prompt-model)."""
import itertools
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import cli

TEMPLATES = ["a photo of a {}.", "a close-up photo of a {}.", "a blurry photo of a {}.",
             "a bright photo of a {}.", "a cropped photo of a {}.", "a photo of the small {}.",
             "a low resolution photo of a {}.", "a good photo of a {}."]
PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
VARIATION = ("viewpoint", "light", "style")  # the keys of prompts/variation.json


def read_tables(dataset):
    """(class content, variation): the tables of prompts/ that build the default prompts."""
    tables = []
    for name in (f"{dataset}.json", "variation.json"):
        try:
            with open(os.path.join(PROMPTS, name), encoding="utf-8") as f:
                tables.append(json.load(f))
        except (OSError, ValueError) as e:
            raise cli.SAUError(f"prompts/{name} is unreadable ({e.__class__.__name__}): restore it "
                               f"from the repository, or pass --prompts FILE") from None
    content, variation = tables
    texts = lambda v: isinstance(v, list) and all(isinstance(t, str) and t.strip() for t in v)
    # a table of lists of texts by name (variation.json may hold notes beside its lists)
    for name, table, keys, shape in (
            (f"{dataset}.json", content.get("classes") if isinstance(content, dict) else None,
             None, '{"classes": {class name: [content, ...]}}'),
            ("variation.json", variation, VARIATION,
             "{" + ", ".join(f'"{k}": [text, ...]' for k in VARIATION) + "}")):
        if not (isinstance(table, dict) and all(k in table for k in keys or ())
                and all(texts(v) for k, v in table.items() if keys is None or k in keys)):
            raise cli.SAUError(f"prompts/{name} must read {shape}: fix it, restore it from the "
                               f"repository, or pass --prompts FILE")
    return content["classes"], variation


def built_prompts(dataset, names, seed):
    """{label: ["<class>, <content>, <viewpoint>, <light>, <style>", ...]}: every combination, in
    an order shuffled by (seed, label); image k takes prompt k mod the count."""
    content, var = read_tables(dataset)
    missing = [n for n in names if not content.get(n)]
    if missing:
        raise cli.SAUError(
            f"prompts/{dataset}.json has no content for {', '.join(missing[:5])}: add it, or pass "
            f"--prompts FILE or --prompt-style templates")
    out = {}
    for c, n in enumerate(names):
        combos = [", ".join(p) for p in itertools.product(
            [n.replace("_", " ")], content[n], var["viewpoint"], var["light"], var["style"])]
        out[c] = [combos[i] for i in np.random.default_rng([seed, c]).permutation(len(combos))]
    return out


def class_prompts(names, prompts_file, style, dataset=None, seed=0):
    """{label: [prompt, ...]}: the file's lines by the class name they begin with, else by style."""
    spoken = [n.replace("_", " ") for n in names]
    if not prompts_file and style == "built":
        return built_prompts(dataset, names, seed)
    if not prompts_file:
        return {c: [t.format(n) for t in TEMPLATES] for c, n in enumerate(spoken)}
    if not os.path.isfile(prompts_file):
        raise cli.SAUError(f"--prompts {prompts_file}: no such file")
    out = {c: [] for c in range(len(names))}
    try:
        with open(prompts_file, encoding="utf-8") as f:
            lines = [line for line in map(str.strip, f) if line]
    except (UnicodeDecodeError, OSError) as e:
        raise cli.SAUError(f"--prompts {prompts_file} is not a readable UTF-8 text file "
                           f"({e.__class__.__name__})") from None
    for line in lines:
        c = class_of(line, names)
        if c is None:
            raise cli.SAUError(f"--prompts {prompts_file}: line {line[:40]!r} begins with no "
                               f"class name")
        out[c].append(line)
    return out


# ---------------------------------------------------- prompts written by a language model

# The paper asked gpt-3.5-turbo for 500 descriptions per class, 30-50 words beginning with the
# class name (not released); ours asks any causal language model the same.
INSTRUCTION = ("Write a description, 30 to 50 words long, of a photo of a {name}. Begin with "
               "the words \"{name}\". Give the photo a setting, a viewpoint and a lighting of its "
               "own. Answer with the description alone, in one paragraph.")
WORDS = (20, 70)  # a description's accepted length in words, around the asked 30-50
MAX_TRIES = 10  # calls in a row that add no line before a class is left short
LM_FILE = "prompts_lm.txt"  # in the pool folder


def lm_lines(path, names):  # {label: [line, ...]} of a prompts file's whole lines
    out = {c: [] for c in range(len(names))}
    for line in whole_lines(path):
        c = class_of(line, names)
        if c is not None:
            out[c].append(line)
    return out


def whole_lines(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text[:text.rfind("\n") + 1].splitlines()  # a last line cut short has no newline yet


def class_of(line, names):
    """The label whose name the line begins with (the longest: "maple tree", not "tree") or None."""
    low = line.lower()
    fits = [c for c, n in enumerate(names) if low.startswith(n.replace("_", " ").lower())
            and not low[len(n):len(n) + 1].isalnum()]
    return max(fits, key=lambda c: len(names[c]), default=None)


def load_language_model(model_id, device):
    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id).to(device).eval()
    except Exception as e:  # a bad folder and a failed download both surface here
        if os.path.isdir(model_id):
            raise cli.SAUError(f"--prompt-model {model_id} is not a transformers causal language "
                               f"model folder ({e.__class__.__name__})") from None
        raise cli.SAUError(f"could not fetch {model_id} from the Hugging Face hub "
                           f"({e.__class__.__name__}); with no network, pass a local folder with "
                           f"--prompt-model DIR") from None
    tok.padding_side = "left"  # the batch's prompts end where the descriptions begin
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model


def quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@torch.no_grad()
def describe(tok, model, name, n, seed, max_new_tokens=96):
    """n one-line descriptions of a photo of the class, begun with its name, drawn by the seed."""
    opening = name[:1].upper() + name[1:]
    ask = INSTRUCTION.format(name=name)
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": ask}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = ask + "\n\n"
    enc = tok([text + opening] * n, return_tensors="pt", padding=True).to(model.device)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(**enc, do_sample=True, top_p=0.95, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id)
    new = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    # decoded alone, a continuation may lose the space before its first word
    joined = [opening + (t if t[:1] in " ,.;:!?'-" else " " + t) for t in new]
    return [" ".join(t.replace('"', "").split()) for t in joined]


def write_lm_prompts(path, names, counts, model_id, device, seed, batch_size=16, world=1):
    """Write counts[c] descriptions of each class into path (--prompts' format), keeping what is
    there; each call seeded by (seed, class, lines accepted, fruitless calls in a row), so a killed
    run ends with the file an uninterrupted one writes. A line not beginning with its class name,
    outside WORDS or repeated is drawn again, for MAX_TRIES fruitless calls in a row at most.
    {label: [lines refused, calls]} of this run."""
    lines = "".join(line + "\n" for line in whole_lines(path))
    if os.path.isfile(path) and open(path, encoding="utf-8").read() != lines:
        cli.write_atomic(path, lines)  # a line a kill cut short goes
    have, spoken = lm_lines(path, names), [n.replace("_", " ") for n in names]
    todo = [c for c, n in enumerate(counts) if n > len(have[c])]
    if not todo:
        return {}
    if world > 1:
        raise cli.SAUError(f"{path} is not written yet: write it in one process (the same command "
                           f"without --shard), then draw the pool with several")
    tok, model = load_language_model(model_id, device)
    drawn = {c: [0, 0] for c in todo}  # lines refused, calls
    with tqdm(total=sum(counts[c] - len(have[c]) for c in todo), unit="line",
              desc="writing prompts", dynamic_ncols=True) as bar, open(path, "ab", 0) as f:
        for c in todo:
            seen, tries = set(have[c]), 0
            while len(seen) < counts[c] and tries < MAX_TRIES:
                call_seed = cli.derived_seed(seed, c, len(seen), tries)
                batch = describe(tok, model, spoken[c], min(batch_size, counts[c] - len(seen)),
                                 call_seed)
                new = []
                for line in batch:
                    ok = class_of(line, names) == c and WORDS[0] <= len(line.split()) <= WORDS[1]
                    if ok and line not in seen and len(seen) < counts[c]:
                        seen.add(line)
                        new.append(line)
                drawn[c][0] += len(batch) - len(new)
                drawn[c][1] += 1
                f.write("".join(line + "\n" for line in new).encode())
                tries = 0 if new else tries + 1
                bar.update(len(new))
    written = lm_lines(path, names)
    short = {spoken[c]: counts[c] - len(written[c]) for c in todo}
    print(f"{path}: refused and drawn again, per class: "
          + ", ".join(f"{spoken[c]} {r}" for c, (r, _) in drawn.items())
          + ("; left short after " + str(MAX_TRIES) + " fruitless calls in a row: "
             + ", ".join(f"{k} by {v}" for k, v in short.items() if v)
             if any(short.values()) else ""))
    return drawn
