"""The text prompts of the synthetic pool: built from the tables in prompts/ (the default), the
eight 'a photo of a {}.' templates, a file of one's own (--prompts FILE, one prompt a line
beginning with its class name), or a file of descriptions written by a language model first, as
the paper's were (--prompt-model).
"""
import itertools
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import cli

TEMPLATES = [
    "a photo of a {}.", "a close-up photo of a {}.", "a blurry photo of a {}.",
    "a bright photo of a {}.", "a cropped photo of a {}.", "a photo of the small {}.",
    "a low resolution photo of a {}.", "a good photo of a {}."
]
PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
VARIATION = ("viewpoint", "light", "style")  # the keys of prompts/variation.json


def read_tables(dataset):
    """(class content, variation) from prompts/: the data that builds the default prompts, each
    table checked for its shape (they are meant to be edited by hand)."""
    tables = []
    for name in (f"{dataset}.json", "variation.json"):
        path = os.path.join(PROMPTS, name)
        try:
            with open(path, encoding="utf-8") as f:
                tables.append(json.load(f))
        except (OSError, ValueError) as e:
            raise cli.SAUError(f"{path} is unreadable ({e.__class__.__name__}): restore it from "
                               f"the repository, or pass --prompts FILE") from None
    content, variation = tables
    shape = '{"classes": {class name: [content, ...]}}'
    if isinstance(content, dict) and "classes" not in content:
        raise cli.SAUError(f"prompts/{dataset}.json has no 'classes': it must read {shape}; fix "
                           f"it, restore it from the repository, or pass --prompts FILE")
    check_table(content.get("classes") if isinstance(content, dict) else None, None,
                f"{dataset}.json", shape)
    check_table(variation, VARIATION, "variation.json",
                "{" + ", ".join(f'"{k}": [text, ...]' for k in VARIATION) + "}")
    return content["classes"], variation


def check_table(table, keys, name, shape):
    """One line for a prompts table that is not a dict of lists of texts (with these keys)."""
    why = None
    if not isinstance(table, dict):
        why = "is not an object"
    else:
        missing = [k for k in keys or () if k not in table]
        # a table of named lists (variation.json) may hold notes beside them ("about")
        texts = lambda v: isinstance(v, list) and all(isinstance(t, str) and t.strip() for t in v)
        bad = [k for k, v in table.items() if (keys is None or k in keys) and not texts(v)]
        if missing:
            why = f"has no {', '.join(map(repr, missing))}"
        elif bad:
            why = f"has {bad[0]!r} as {type(table[bad[0]]).__name__}, not a list of texts"
    if why:
        raise cli.SAUError(f"prompts/{name} {why}: it must read {shape}; fix it, restore it from "
                           f"the repository, or pass --prompts FILE")


def built_prompts(dataset, names, seed):
    """{label: [prompt, ...]}: every class's content crossed with the variation tables, "<class>,
    <content>, <viewpoint>, <light>, <style>", in an order shuffled by (seed, label): image k takes
    prompt k mod the count, the same in every run, shard and resume."""
    content, var = read_tables(dataset)
    missing = [n for n in names if not content.get(n)]
    if missing:
        raise cli.SAUError(
            f"prompts/{dataset}.json has no content for {', '.join(missing[:5])}: add it, or pass "
            f"--prompts FILE or --prompt-style templates")
    out = {}
    for c, n in enumerate(names):
        combos = [
            ", ".join(p) for p in itertools.product([n.replace("_", " ")], content[n],
                                                    var["viewpoint"], var["light"], var["style"])
        ]
        out[c] = [combos[i] for i in np.random.default_rng([seed, c]).permutation(len(combos))]
    return out


def class_prompts(names, prompts_file, style, dataset=None, seed=0):
    """{label: [prompt, ...]}: the file's lines grouped by the class name they begin with, else by
    style: "built" from prompts/ (needs dataset, seed) or "templates"."""
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

# The paper asked gpt-3.5-turbo for 500 descriptions per class, each 30-50 words beginning with the
# class name; its prompts were not released. Ours asks any causal language model the same.
INSTRUCTION = ("Write a description, 30 to 50 words long, of a photo of a {name}. Begin with "
               "the words \"{name}\". Give the photo a setting, a viewpoint and a lighting of its "
               "own. Answer with the description alone, in one paragraph.")
WORDS = (20, 70)  # a description's accepted length in words, around the asked 30-50
MAX_TRIES = 10  # calls in a row that add no line before a class is left short
LM_FILE = "prompts_lm.txt"  # in the pool folder


def lm_lines(path, names):
    """{label: [line, ...]} of a prompts file, its whole lines."""
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
    """The label whose name the line begins with (the longest that fits: "maple tree" before
    "tree"), or None."""
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
    """n descriptions of a photo of the class, sampled with this seed alone (the same texts in
    every run), each begun with the class name by the prompt itself and joined into one line."""
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
    """Write counts[c] descriptions of each class into path, the --prompts FILE format, keeping
    what is there: a rerun reuses the file, a killed run writes only the missing lines and ends
    with the file an uninterrupted run writes (path + ".state" records how far each call got). A
    line that does not begin with its class name, falls outside WORDS or repeats one of its class
    is drawn again, MAX_TRIES fruitless calls in a row at most; the refusals per class, in one
    line."""
    state_path = path + ".state"
    lines = whole_lines(path)
    state = cli.read_json(state_path) if os.path.isfile(state_path) else {}
    done = state.get("lines", len(lines)) if isinstance(state, dict) else len(lines)
    tries = {int(c): t for c, t in state.get("tries", {}).items()} if done <= len(lines) else {}
    if len(lines) != done or (lines and not open(path).read().endswith("\n")):
        # a call's lines written after the last record (or cut short) are drawn again
        lines = lines[:done]
        cli.write_atomic(path, "".join(line + "\n" for line in lines))
    have = lm_lines(path, names)
    spoken = [n.replace("_", " ") for n in names]
    todo = {c: n - len(have[c]) for c, n in enumerate(counts)
            if n > len(have[c]) and tries.get(c, 0) < MAX_TRIES}
    if not todo:
        return
    if world > 1:
        raise cli.SAUError(f"{path} is not written yet: write it in one process (the same command "
                           f"without torchrun or --shard), then draw the pool with several")
    tok, model = load_language_model(model_id, device)
    refused, n_lines = {c: 0 for c in todo}, len(lines)
    with tqdm(total=sum(todo.values()), unit="line", desc="writing prompts",
              dynamic_ncols=True) as bar, open(path, "a", encoding="utf-8") as f:
        for c in todo:
            seen = set(have[c])
            while len(seen) < counts[c] and tries.get(c, 0) < MAX_TRIES:
                cli.check_interrupt()
                # a call's seed follows from what is written: a resumed run draws the same texts
                call_seed = cli.derived_seed(seed, c, len(seen), tries.get(c, 0))
                drawn = describe(tok, model, spoken[c], min(batch_size, counts[c] - len(seen)),
                                 call_seed)
                new = []
                for line in drawn:
                    ok = class_of(line, names) == c and WORDS[0] <= len(line.split()) <= WORDS[1]
                    if ok and line not in seen and len(seen) < counts[c]:
                        seen.add(line)
                        new.append(line)
                refused[c] += len(drawn) - len(new)
                f.write("".join(line + "\n" for line in new))
                f.flush()
                os.fsync(f.fileno())
                n_lines += len(new)
                tries[c] = 0 if new else tries.get(c, 0) + 1
                cli.write_atomic(state_path, json.dumps({"lines": n_lines, "tries": tries}))
                bar.update(len(new))
    written = lm_lines(path, names)
    short = {spoken[c]: counts[c] - len(written[c]) for c in todo}
    print(f"{path}: refused and drawn again, per class: "
          + ", ".join(f"{spoken[c]} {n}" for c, n in refused.items())
          + ("; left short after " + str(MAX_TRIES) + " fruitless calls in a row: "
             + ", ".join(f"{k} by {v}" for k, v in short.items() if v)
             if any(short.values()) else ""))
