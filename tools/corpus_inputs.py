#!/usr/bin/env python
"""Realistic calibration and evaluation inputs for the real-model corpus.

For each model fetched by ``tools/fetch_models.py`` this writes two disjoint sets,
``<cache>/inputs/<model>/calib.npz`` and ``eval.npz`` (different seeds; MiniLM also uses
disjoint sentences), plus ``meta.json`` (seeds, layout, and sanity statistics of the
model's outputs on them). Every set is run through onnxruntime and must give finite
outputs.

Layout of an ``.npz``: one array per graph input, keyed by the input's name, first axis =
samples. ``meta.json`` gives each input's layout:

* ``"batch"``: the samples axis *is* the model's batch axis 0; sample ``i`` is
  ``arr[i:i+1]`` (and a batch of samples ``arr[i:j]`` where the model allows it).
* ``"stacked"``: the input has no batch axis at 0 (a scalar ``sr``, silero's
  ``state`` [2, B, 128]); one extra leading axis was added, so sample ``i`` is ``arr[i]``.

:func:`sample_feed` builds the feed for sample ``i`` from either.

Generators:

* OCR (ppocr_det / ppocr_rec / ppocr_cls): text rendered with Pillow (random English words,
  numbers, dates, prices) on light noisy backgrounds; det gets 640x640 pages with several
  lines, rec 48x320 single lines, cls 48x192 lines of which about half are rotated 180
  degrees. Normalized like rapidocr (BGR, ``(x / 255 - 0.5) / 0.5``, CHW, zero padding).
* minilm: real English sentences tokenized with the BERT WordPiece vocabulary shipped next
  to the model (``minilm.tokenizer.json``), padded/truncated to 128 tokens.
* silero_vad: 16 kHz speech-like audio (harmonic source through formant envelopes,
  syllabic modulation, fricative noise, pauses) and silence/noise chunks of 64 context +
  512 new samples; ``state`` is the model's own recurrent state after 0-7 earlier chunks of
  the same stream (zeros for a stream's first chunk), ``sr`` is 16000.
* zoo_*: smooth image-like fields, ImageNet-normalized, of the declared shape.
* opennsfw, opennsfw_torch: the same smooth fields as 0-255 pixels, preprocessed like
  open_nsfw's Caffe reference: NHWC 224x224x3, BGR, minus the mean [104, 117, 123] (values
  in [-123, 151]).

Usage::

    python tools/corpus_inputs.py [--cache DIR] [--only NAME ...] [--n-calib 32] [--n-eval 32]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import unicodedata
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_models

EVAL_SEED_OFFSET = 1_000_003
SAMPLE_RATE = 16000

# ---------------------------------------------------------------------------------------
# Model inputs
# ---------------------------------------------------------------------------------------


def model_inputs(model_path: Path | str) -> list[dict[str, Any]]:
    """The graph inputs (not initializers): name, numpy dtype, dims (int, str or None)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    out = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        dims: list[int | str | None] = []
        for d in t.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        out.append(
            {"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type), "dims": dims}
        )
    return out


def sample_feed(
    arrays: dict[str, np.ndarray], layout: dict[str, str], i: int
) -> dict[str, np.ndarray]:
    """The onnxruntime feed for sample ``i`` of a set (see the module docstring)."""
    return {
        k: (np.asarray(a[i]) if layout.get(k) == "stacked" else a[i : i + 1])
        for k, a in arrays.items()
    }


def load_set(
    name: str, split: str = "calib", cache: Path | str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load ``<cache>/inputs/<name>/<split>.npz``; returns (arrays, layout)."""
    root = Path(cache) if cache is not None else fetch_models.default_cache()
    folder = root / "inputs" / name
    with np.load(folder / f"{split}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    layout = json.loads((folder / "meta.json").read_text())["layout"]
    return arrays, layout


def _float_input(inputs: list[dict[str, Any]]) -> dict[str, Any]:
    for inp in inputs:
        if np.dtype(inp["dtype"]).kind == "f":
            return inp
    raise ValueError("model has no float input")


# ---------------------------------------------------------------------------------------
# OCR: rendered text
# ---------------------------------------------------------------------------------------

_WORDS_TEXT = """
the of and to in is you that it he was for on are as with his they at be this have from
or one had by word but not what all were we when your can said there use an each which
she do how their if will up other about out many then them these so some her would make
like him into time has look two more write go see number no way could people my than
first water been call who oil its now find long down day did get come made may part
invoice total amount date order customer account payment balance address street city
station market report page section table figure chapter summary receipt delivery price
quantity product service office manager company limited street north south east west
Monday Tuesday Friday January March October London Paris Berlin Madrid Tokyo Boston
Hello World Open Closed Exit Entrance Warning Notice Please Thank Welcome Street Road
"""
WORDS = _WORDS_TEXT.split()


def _random_token(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.72:
        w = str(rng.choice(WORDS))
        if rng.random() < 0.15:
            w = w.capitalize()
        elif rng.random() < 0.05:
            w = w.upper()
        return w
    if r < 0.80:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
    if r < 0.86:
        return f"${rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
    if r < 0.92:
        return f"{rng.integers(1990, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    if r < 0.96:
        return f"{rng.integers(100, 1000)}-{rng.integers(1000, 10000)}"
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return "".join(rng.choice(list(letters), 2)) + f"-{rng.integers(100, 9999)}"


def random_line(rng: np.random.Generator, lo: int = 1, hi: int = 6) -> str:
    text = " ".join(_random_token(rng) for _ in range(int(rng.integers(lo, hi + 1))))
    if rng.random() < 0.2:
        text += str(rng.choice([".", ",", ":", "!", "?"]))
    return text


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size), 1  # scalable font (Pillow with FreeType)
    except (TypeError, ImportError, OSError, AttributeError):
        return ImageFont.load_default(), max(1, round(size / 11))  # bitmap font, scaled up


def render_text(text: str, size: int, color: tuple[int, int, int]):
    """RGBA image of ``text`` (transparent background), cropped to the ink plus a margin."""
    from PIL import Image, ImageDraw

    font, scale = _font(size)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    w, h = max(1, right - left), max(1, bottom - top)
    pad = max(2, size // 8)
    img = Image.new("RGBA", (w + 2 * pad, h + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=(*color, 255))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.BILINEAR)
    return img


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = rng.uniform(195, 250)
    tint = rng.uniform(-10, 10, size=3)
    gy = np.linspace(0, 1, h)[:, None, None] * rng.uniform(-18, 18)
    gx = np.linspace(0, 1, w)[None, :, None] * rng.uniform(-18, 18)
    return np.clip(base + tint[None, None, :] + gy + gx, 0, 255)


def _finish(rng: np.random.Generator, img) -> np.ndarray:
    """Blur a little, add sensor noise; return HxWx3 uint8 RGB."""
    from PIL import ImageFilter

    if rng.random() < 0.6:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 0.9))))
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(2, 9), size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.8:
        v = int(rng.integers(0, 70))
        return (v, v, v)
    return tuple(int(c) for c in rng.integers(0, 120, size=3))  # type: ignore[return-value]


def rapidocr_normalize(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32 as rapidocr feeds it (BGR, (x/255 - 0.5)/0.5)."""
    bgr = rgb[:, :, ::-1].astype(np.float32)
    return ((bgr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy()


def render_page(rng: np.random.Generator, h: int = 640, w: int = 640) -> tuple[np.ndarray, list]:
    """A page with several lines of text; returns (HxWx3 uint8 RGB, line boxes)."""
    from PIL import Image

    page = Image.fromarray(_background(rng, w, h).astype(np.uint8), "RGB")
    y = int(rng.integers(8, 60))
    boxes = []
    for _ in range(int(rng.integers(4, 13))):
        size = int(rng.integers(14, 42))
        line = render_text(random_line(rng, 1, 8), size, _ink(rng))
        x = int(rng.integers(5, max(6, w // 3)))
        if y + line.height > h:
            break
        page.paste(line, (x, y), line)
        boxes.append((x, y, min(w, x + line.width), y + line.height))
        y += line.height + int(rng.integers(2, 40))
    return _finish(rng, page), boxes


def render_line(rng: np.random.Generator, text: str) -> np.ndarray:
    from PIL import Image

    line = render_text(text, int(rng.integers(24, 44)), _ink(rng))
    margin = int(rng.integers(1, 8))
    w, h = line.width + 2 * margin, line.height + 2 * margin
    img = Image.fromarray(_background(rng, w, h).astype(np.uint8), "RGB")
    img.paste(line, (margin, margin), line)
    return _finish(rng, img)


def resize_norm_line(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's rec/cls resize_norm_img: keep the ratio, cap the width, pad with 0."""
    from PIL import Image

    h, w = rgb.shape[:2]
    resized_w = min(width, math.ceil(height * w / float(h)))
    img = Image.fromarray(rgb).resize((resized_w, height), Image.Resampling.BILINEAR)
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = rapidocr_normalize(np.asarray(img))
    return out


def _dims(inp: dict[str, Any], defaults: list[int]) -> list[int]:
    return [d if isinstance(d, int) else defaults[k] for k, d in enumerate(inp["dims"])]


def gen_ppocr_det(model_path, n, rng, split):
    inp = _float_input(model_inputs(model_path))
    _, _, h, w = _dims(inp, [1, 3, 640, 640])
    pages = [render_page(rng, h, w) for _ in range(n)]
    x = np.stack([rapidocr_normalize(p) for p, _ in pages])
    return {inp["name"]: x}, {inp["name"]: "batch"}, {"lines": [len(b) for _, b in pages]}


def _gen_lines(model_path, n, rng, default_w, rotate_frac):
    inp = _float_input(model_inputs(model_path))
    _, _, h, w = _dims(inp, [1, 3, 48, default_w])
    texts, rotated, arrays = [], [], []
    for _ in range(n):
        text = random_line(rng, 1, 4)
        rgb = render_line(rng, text)
        rot = bool(rng.random() < rotate_frac)
        if rot:
            rgb = rgb[::-1, ::-1].copy()
        texts.append(text)
        rotated.append(rot)
        arrays.append(resize_norm_line(rgb, h, w))
    return inp["name"], np.stack(arrays), texts, rotated


def gen_ppocr_rec(model_path, n, rng, split):
    name, x, texts, _ = _gen_lines(model_path, n, rng, 320, 0.0)
    return {name: x}, {name: "batch"}, {"texts": texts}


def gen_ppocr_cls(model_path, n, rng, split):
    name, x, texts, rotated = _gen_lines(model_path, n, rng, 192, 0.5)
    return {name: x}, {name: "batch"}, {"texts": texts, "rotated_180": rotated}


# ---------------------------------------------------------------------------------------
# MiniLM: real sentences, BERT WordPiece
# ---------------------------------------------------------------------------------------

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "The weather forecast predicts heavy rain for the weekend.",
    "She finished reading the novel in a single afternoon.",
    "Our team shipped the new release two days ahead of schedule.",
    "How do I reset my password if I no longer have access to my email?",
    "The museum is closed on Mondays and public holidays.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Please turn off your phone before the movie starts.",
    "The stock market fell sharply after the interest rate announcement.",
    "My grandmother bakes the best apple pie in the whole town.",
    "The train to Boston leaves from platform four at 6:45 pm.",
    "Regular exercise can improve both physical and mental health.",
    "The committee approved the budget after a long debate.",
    "He forgot his umbrella at the restaurant again.",
    "Children were playing football in the park until sunset.",
    "The software update fixes several security vulnerabilities.",
    "Can you recommend a good book about the history of mathematics?",
    "The airline cancelled dozens of flights because of the storm.",
    "A cup of coffee costs three dollars at the cafe downstairs.",
    "The river flooded the village after days of continuous rain.",
    "She speaks French, Spanish and a little bit of Japanese.",
    "The new bridge will reduce traffic in the city centre.",
    "Astronomers observed a supernova in a distant galaxy.",
    "The kitten fell asleep on a pile of warm laundry.",
    "Our flight was delayed by three hours, so we missed the connection.",
    "The recipe calls for two eggs, a cup of flour and some milk.",
    "Electric cars are becoming more affordable every year.",
    "The teacher explained the theorem with a simple drawing.",
    "Thousands of people gathered to watch the fireworks.",
    "I think the meeting should be moved to Thursday morning.",
    "The hotel room had a beautiful view of the mountains.",
    "Researchers trained the model on millions of labelled images.",
    "The library offers free courses on programming for beginners.",
    "He has been learning to play the piano for six years.",
    "The price of fresh vegetables rose during the drought.",
    "What time does the pharmacy open on Sunday?",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "A strong earthquake shook the coastal region early this morning.",
    "The startup raised twenty million dollars in its latest funding round.",
    "They hiked to the top of the hill to watch the sunrise.",
    "The doctor advised him to drink more water and sleep longer.",
    "Our neighbours are repainting their house bright yellow.",
    "The court ruled that the contract was not valid.",
    "Most birds migrate south before the winter arrives.",
    "She wrote a letter to the editor about the noise in the park.",
    "The database query takes too long when the table is large.",
    "Farmers are worried about the effect of the late frost on crops.",
    "The children built a sandcastle near the edge of the water.",
    "Is there a vegetarian option on the lunch menu today?",
    "The company reported record profits for the third quarter.",
    "A bicycle is often the fastest way to get around the old town.",
    "The volcano has been dormant for more than two centuries.",
    "He apologised for arriving late to the interview.",
    "The city council voted to plant a thousand new trees.",
    "My laptop battery only lasts about two hours now.",
    "The film won three awards at the international festival.",
    "Please send me the report by the end of the week.",
    "The ancient temple was rebuilt after the fire.",
    "Tigers are an endangered species in many parts of Asia.",
    "The bakery sells fresh bread every morning at seven.",
    "We should back up the server before installing the patch.",
    "She was elected president of the student union.",
    "The museum's new exhibition explores the art of the Renaissance.",
    "Heavy snow closed the mountain pass for several days.",
    "The dog barked loudly at the delivery truck.",
    "How many languages are spoken in India?",
    "The patient recovered quickly after the surgery.",
    "A new study links poor sleep to a higher risk of heart disease.",
    "The band is touring Europe for the rest of the summer.",
    "Our internet connection drops every evening around nine.",
    "The archaeologists found pottery that is four thousand years old.",
    "I prefer tea to coffee, especially in the afternoon.",
    "The government announced new rules for online privacy.",
    "Two players were injured during the second half of the match.",
    "The garden is full of roses, tulips and sunflowers in June.",
    "He translated the poem from Russian into English.",
    "The factory will hire two hundred workers next year.",
    "Where can I find the nearest charging station for my car?",
    "The satellite sends weather data back to Earth every hour.",
    "She knitted a warm scarf for her brother's birthday.",
    "Traffic on the highway was moving slowly because of an accident.",
    "The chef prepared a five-course dinner for the guests.",
    "The students protested against the increase in tuition fees.",
    "Whales communicate with each other using complex songs.",
    "The printer on the second floor is out of paper again.",
    "A sudden gust of wind blew the papers off the desk.",
    "The team celebrated their victory with a party at the beach.",
    "The old lighthouse still guides ships along the rocky coast.",
    "My favourite season is autumn because of the colourful leaves.",
    "The police are searching for witnesses to the robbery.",
    "The app lets you track your spending and set monthly goals.",
    "He carefully packed the fragile glasses in newspaper.",
    "The conference will be held online because of the strike.",
    "Bees play an essential role in pollinating fruit trees.",
    "The bus driver waited for the elderly woman to sit down.",
    "After years of research, the vaccine was finally approved.",
    "The sunset painted the sky in shades of orange and pink.",
    "Running a marathon requires months of careful preparation.",
    "The naive cafe owner's résumé mentioned a façade renovation in Zürich.",
    (
        "In the late nineteenth century, the expansion of railway networks across the "
        "continent transformed trade, allowing farmers to sell their produce in distant "
        "cities, while factories could source raw materials cheaply; historians still "
        "debate whether the social costs of this rapid change, including the decline of "
        "rural communities and the growth of crowded industrial towns, were outweighed by "
        "the economic benefits that followed over the next several decades of growth."
    ),
]


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """Minimal BERT (uncased) tokenizer: BertNormalizer + BertPreTokenizer + WordPiece."""

    def __init__(self, vocab: dict[str, int], lowercase: bool = True, max_chars: int = 100):
        self.vocab = vocab
        self.lowercase = lowercase
        self.max_chars = max_chars
        self.unk = vocab["[UNK]"]
        self.cls = vocab["[CLS]"]
        self.sep = vocab["[SEP]"]
        self.pad = vocab.get("[PAD]", 0)

    @classmethod
    def from_file(cls, path: Path | str) -> WordPieceTokenizer:
        """From a HuggingFace tokenizer.json (WordPiece model) or a BERT vocab.txt."""
        path = Path(path)
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            norm = data.get("normalizer") or {}
            return cls(data["model"]["vocab"], lowercase=bool(norm.get("lowercase", True)))
        words = path.read_text(encoding="utf-8").splitlines()
        return cls({w: i for i, w in enumerate(words)})

    def _normalize(self, text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            control = unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\t\n\r"
            if cp == 0 or cp == 0xFFFD or control:
                continue
            if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.lowercase:
            text = unicodedata.normalize("NFD", text.lower())
            text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        return text

    def _pretokenize(self, text: str) -> list[str]:
        words: list[str] = []
        for chunk in text.split():
            cur = ""
            for ch in chunk:
                if _is_punct(ch):
                    if cur:
                        words.append(cur)
                        cur = ""
                    words.append(ch)
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk]
            ids.append(found)
            start = end
        return ids

    def tokenize(self, text: str) -> list[int]:
        return [i for w in self._pretokenize(self._normalize(text)) for i in self._wordpiece(w)]

    def encode(self, text: str, max_len: int = 128) -> tuple[np.ndarray, np.ndarray]:
        ids = [self.cls, *self.tokenize(text)[: max_len - 2], self.sep]
        out = np.full(max_len, self.pad, dtype=np.int64)
        out[: len(ids)] = ids
        mask = np.zeros(max_len, dtype=np.int64)
        mask[: len(ids)] = 1
        return out, mask


def sentence_split(split: str) -> list[str]:
    """Disjoint halves of SENTENCES (fixed permutation): 'calib' or 'eval'."""
    order = np.random.default_rng(20240611).permutation(len(SENTENCES))
    half = len(order) // 2
    idx = order[:half] if split == "calib" else order[half:]
    return [SENTENCES[i] for i in sorted(idx)]


def _tokenizer_for(model_path: Path) -> WordPieceTokenizer:
    stem = model_path.with_suffix("")
    for cand in (Path(f"{stem}.tokenizer.json"), Path(f"{stem}.vocab.txt")):
        if cand.exists():
            return WordPieceTokenizer.from_file(cand)
    raise FileNotFoundError(f"no tokenizer next to {model_path} (run tools/fetch_models.py)")


def gen_minilm(model_path, n, rng, split):
    model_path = Path(model_path)
    inputs = {i["name"]: i for i in model_inputs(model_path)}
    seq = inputs.get("input_ids", {}).get("dims", [None, None])[-1]
    seq = seq if isinstance(seq, int) else 128
    tok = _tokenizer_for(model_path)
    pool = sentence_split(split)
    order = rng.permutation(len(pool))
    texts = []
    for j in range(n):
        if j < len(pool):
            texts.append(pool[order[j]])
        else:  # more samples than sentences: join 2-3 sentences of the same split
            k = int(rng.integers(2, 4))
            texts.append(" ".join(pool[i] for i in rng.choice(len(pool), k, replace=False)))
    enc = [tok.encode(t, seq) for t in texts]
    ids = np.stack([e[0] for e in enc])
    mask = np.stack([e[1] for e in enc])
    arrays: dict[str, np.ndarray] = {}
    for name, inp in inputs.items():
        if name == "input_ids":
            arrays[name] = ids
        elif name == "attention_mask":
            arrays[name] = mask
        elif name == "token_type_ids":
            arrays[name] = np.zeros_like(ids)
        else:
            raise ValueError(f"minilm: don't know how to fill input {name!r}")
        arrays[name] = arrays[name].astype(inp["dtype"])
    tokens = [int(m.sum()) for m in mask]
    return arrays, dict.fromkeys(arrays, "batch"), {"texts": texts, "tokens": tokens}


# ---------------------------------------------------------------------------------------
# Silero VAD: speech-like audio
# ---------------------------------------------------------------------------------------


def synth_audio(rng: np.random.Generator, kind: str, n: int, sr: int = SAMPLE_RATE):
    """``n`` samples of float32 audio: 'speech', 'mixed' (speech with pauses) or 'silence'."""
    t = np.arange(n) / sr
    noise_rms = 10 ** rng.uniform(-4, -2.5)
    noise = rng.standard_normal(n) * noise_rms
    if rng.random() < 0.3:  # mains hum
        noise += noise_rms * 2 * np.sin(2 * np.pi * rng.choice([50, 60]) * t + rng.uniform(0, 6))
    if kind == "silence":
        return noise.astype(np.float32)
    f0 = rng.uniform(85, 255)
    glide = 1 + rng.uniform(-0.15, 0.15) * t / max(t[-1], 1e-3)
    vibrato = 1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 7) * t + rng.uniform(0, 6))
    inst_f0 = f0 * glide * vibrato
    phase = 2 * np.pi * np.cumsum(inst_f0) / sr
    formants = [
        (rng.uniform(300, 900), rng.uniform(60, 160)),
        (rng.uniform(900, 2500), rng.uniform(90, 200)),
        (rng.uniform(2400, 3500), rng.uniform(120, 250)),
    ]
    voiced = np.zeros(n)
    for k in range(1, int(7000 / (f0 * 1.2))):
        fk = k * f0
        amp = sum(np.exp(-0.5 * ((fk - f) / bw) ** 2) for f, bw in formants) + 0.02
        voiced += amp / math.sqrt(k) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    rate = rng.uniform(3, 6)  # syllables per second
    env = (0.5 - 0.5 * np.cos(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))) ** 1.5
    fric = np.diff(rng.standard_normal(n + 1)) * 0.3  # high-passed noise
    fric_env = np.clip(np.sin(2 * np.pi * rate * 0.5 * t + rng.uniform(0, 6)), 0, None) ** 8
    speech = env * voiced / (np.abs(voiced).max() + 1e-9) + fric * fric_env * 0.3
    if kind == "mixed":  # pauses with 20 ms ramps
        gate = np.ones(n)
        for _ in range(int(rng.integers(1, 4))):
            a = int(rng.integers(0, n))
            b = min(n, a + int(rng.integers(sr // 10, sr // 3)))
            gate[a:b] = 0
        ramp = np.hanning(int(0.02 * sr))
        gate = np.convolve(gate, ramp / ramp.sum(), mode="same")
        speech *= gate
    rms = float(np.sqrt(np.mean(speech**2))) + 1e-12
    speech *= 10 ** rng.uniform(-1.7, -0.7) / rms
    return (speech + noise).astype(np.float32)


def gen_silero_vad(model_path, n, rng, split):
    """Chunks of 64 context + 512 samples; state from running the model on the stream."""
    import onnxruntime as ort

    inputs = {i["name"]: i for i in model_inputs(model_path)}
    x_name = "input" if "input" in inputs else _float_input(list(inputs.values()))["name"]
    state_name = "state" if "state" in inputs else None
    sr_name = "sr" if "sr" in inputs else None
    chunk, context = 512, 64
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    xs, states, kinds, warm = [], [], [], []
    for _ in range(n):
        kind = str(rng.choice(["speech", "speech", "mixed", "silence"]))
        skip = int(rng.integers(0, 8)) if rng.random() < 0.75 else 0
        audio = synth_audio(rng, kind, (skip + 1) * chunk)
        state = np.zeros((2, 1, 128), dtype=np.float32)
        ctx = np.zeros(context, dtype=np.float32)
        for c in range(skip + 1):
            x = np.concatenate([ctx, audio[c * chunk : (c + 1) * chunk]])[None, :]
            if c == skip:
                break
            feed = {x_name: x}
            if state_name:
                feed[state_name] = state
            if sr_name:
                feed[sr_name] = np.array(SAMPLE_RATE, dtype=np.int64)
            _, state = sess.run(None, feed)[:2]
            ctx = x[0, -context:]
        xs.append(x[0])
        states.append(state.astype(np.float32))
        kinds.append(kind)
        warm.append(skip)
    arrays = {x_name: np.stack(xs).astype(np.float32)}
    layout = {x_name: "batch"}
    if state_name:
        arrays[state_name] = np.stack(states)  # [N, 2, 1, 128]
        layout[state_name] = "stacked"
    if sr_name:
        arrays[sr_name] = np.full(n, SAMPLE_RATE, dtype=np.int64)
        layout[sr_name] = "stacked"
    return arrays, layout, {"kinds": kinds, "warm_chunks": warm}


# ---------------------------------------------------------------------------------------
# Zoo and anything else: image-like / generic
# ---------------------------------------------------------------------------------------


def gen_image_like(model_path, n, rng, split):
    arrays, layout = {}, {}
    for inp in model_inputs(model_path):
        dt = np.dtype(inp["dtype"])
        dims = [d if isinstance(d, int) else 1 for d in inp["dims"]]
        if not dims:
            arrays[inp["name"]] = np.zeros(n, dtype=dt)
            layout[inp["name"]] = "stacked"
            continue
        shape = [n, *dims[1:]]
        if dt.kind == "f" and len(dims) == 4:
            arr = fetch_models.smooth_image_batch(rng, shape)
        elif dt.kind == "f":
            arr = rng.standard_normal(shape)
        else:
            arr = np.zeros(shape)
        arrays[inp["name"]] = arr.astype(dt)
        layout[inp["name"]] = "batch"
    return arrays, layout, {}


CAFFE_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def caffe_bgr_nhwc_batch(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """``n`` NHWC float32 images as Caffe models (open_nsfw) take them: 0-255 BGR minus
    :data:`CAFFE_MEAN_BGR`. The pixels are :func:`fetch_models.smooth_image_batch`'s fields
    with the ImageNet normalization undone, i.e. the same [0, 1] RGB images, rescaled."""
    normalized = fetch_models.smooth_image_batch(rng, (n, 3, h, w))
    mean = fetch_models.IMAGENET_MEAN[None, :, None, None]
    std = fetch_models.IMAGENET_STD[None, :, None, None]
    rgb = np.clip(normalized * std + mean, 0.0, 1.0) * 255.0  # N, 3 (RGB), H, W
    bgr_nhwc = rgb[:, ::-1].transpose(0, 2, 3, 1)
    return np.ascontiguousarray(bgr_nhwc - CAFFE_MEAN_BGR, dtype=np.float32)


def gen_opennsfw(model_path, n, rng, split):
    inp = _float_input(model_inputs(model_path))
    _, h, w, c = _dims(inp, [1, 224, 224, 3])
    if c != 3:
        raise ValueError(f"opennsfw: expected an NHWC input with 3 channels, got {inp['dims']}")
    return {inp["name"]: caffe_bgr_nhwc_batch(rng, n, h, w)}, {inp["name"]: "batch"}, {}


Generator = Callable[..., tuple[dict[str, np.ndarray], dict[str, str], dict[str, Any]]]
GENERATORS: dict[str, Generator] = {
    "ppocr_det": gen_ppocr_det,
    "ppocr_rec": gen_ppocr_rec,
    "ppocr_cls": gen_ppocr_cls,
    "minilm": gen_minilm,
    "silero_vad": gen_silero_vad,
    "opennsfw": gen_opennsfw,
    "opennsfw_torch": gen_opennsfw,
}


def generator_for(name: str) -> Generator:
    return GENERATORS.get(name, gen_image_like)


def base_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def generate(
    name: str, model_path: Path | str, n: int, split: str = "calib", seed: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, Any]]:
    """Arrays (first axis = samples), layout per input, and generator notes for one split."""
    if seed is None:
        seed = base_seed(name) + (EVAL_SEED_OFFSET if split == "eval" else 0)
    rng = np.random.default_rng(seed)
    return generator_for(name)(Path(model_path), n, rng, split)


# ---------------------------------------------------------------------------------------
# Checks and sanity statistics
# ---------------------------------------------------------------------------------------


def run_set(model_path, arrays, layout) -> list[list[np.ndarray]]:
    """Run every sample (batch 1) through onnxruntime; raise if any output is not finite."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    n = len(next(iter(arrays.values())))
    outs = []
    for i in range(n):
        res = sess.run(None, sample_feed(arrays, layout, i))
        for o in res:
            if np.asarray(o).dtype.kind == "f" and not np.isfinite(o).all():
                raise RuntimeError(f"{model_path}: sample {i} gives non-finite outputs")
        outs.append(res)
    return outs


def _ctc_decode(probs: np.ndarray, chars: list[str]) -> str:
    idx = probs.argmax(axis=-1)
    out, prev = [], -1
    for i in idx:
        if i != prev and i != 0 and i < len(chars):
            out.append(chars[i])
        prev = i
    return "".join(out)


def _similarity(a: str, b: str) -> float:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio()


def sanity(name: str, model_path: Path, outs, notes: dict[str, Any]) -> dict[str, Any]:
    """Model-specific evidence that the inputs are realistic (e.g. OCR reads the text)."""
    first = [np.asarray(o[0]) for o in outs]
    k = next((j for j, o in enumerate(outs[0]) if np.asarray(o).dtype.kind == "f"), 0)
    flt = [np.asarray(o[k], dtype=np.float64) for o in outs]
    stats: dict[str, Any] = {
        "output": k,  # index of the first float output, summarized below
        "output_mean": float(np.mean([f.mean() for f in flt])),
        "output_std_within_sample": float(np.mean([f.std() for f in flt])),
        "output_std_across_samples": float(np.stack(flt).std(axis=0).mean()),
    }
    if name == "ppocr_cls" and "rotated_180" in notes:
        pred = [bool(f.reshape(-1, 2)[0].argmax() == 1) for f in first]
        hits = [p == r for p, r in zip(pred, notes["rotated_180"], strict=True)]
        stats["direction_accuracy"] = float(np.mean(hits))
    if name == "ppocr_rec" and "texts" in notes:
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}
        if "character" in meta:
            chars = ["blank", *meta["character"].splitlines(), " "]
            read = [_ctc_decode(f[0], chars) for f in first]
            truth = notes["texts"]
            pairs = [(t, r.strip()) for t, r in zip(truth, read, strict=True)]
            stats["exact_match"] = float(np.mean([r == t for t, r in pairs]))
            stats["char_similarity"] = float(np.mean([_similarity(r, t) for t, r in pairs]))
            stats["examples"] = [list(p) for p in pairs[:4]]
    if name == "ppocr_det":
        stats["text_pixel_fraction"] = float(np.mean([(f > 0.3).mean() for f in first]))
    if name == "silero_vad" and "kinds" in notes:
        probs = [float(f.ravel()[0]) for f in first]
        by: dict[str, list[float]] = {}
        for k, p in zip(notes["kinds"], probs, strict=True):
            by.setdefault(k, []).append(p)
        stats["speech_prob_by_kind"] = {k: float(np.mean(v)) for k, v in sorted(by.items())}
    if name == "minilm" and "tokens" in notes:
        stats["tokens_mean"] = float(np.mean(notes["tokens"]))
        stats["tokens_max"] = int(np.max(notes["tokens"]))
    return stats


def write_sets(
    name: str,
    model_path: Path | str,
    out_dir: Path | str,
    n_calib: int = 32,
    n_eval: int = 32,
    verify: bool = True,
) -> dict[str, Any]:
    """Write calib.npz, eval.npz and meta.json for one model; return the meta dict."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"model": name, "model_path": str(model_path), "splits": {}}
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        seed = base_seed(name) + (EVAL_SEED_OFFSET if split == "eval" else 0)
        arrays, layout, notes = generate(name, model_path, n, split, seed)
        path = out_dir / f"{split}.npz"
        tmp = out_dir / f".{split}.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(path)
        info: dict[str, Any] = {
            "path": str(path),
            "seed": seed,
            "samples": n,
            "arrays": {
                k: {"shape": list(a.shape), "dtype": a.dtype.name} for k, a in arrays.items()
            },
        }
        if verify:
            info["check"] = sanity(name, model_path, run_set(model_path, arrays, layout), notes)
        meta["layout"] = layout
        meta["splits"][split] = info
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--only", nargs="+", metavar="NAME")
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--n-eval", type=int, default=32)
    args = parser.parse_args(argv)
    cache = args.cache if args.cache is not None else fetch_models.default_cache()
    try:
        paths = fetch_models.fetch(args.only, cache)
    except fetch_models.FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        meta = write_sets(name, path, Path(cache) / "inputs" / name, args.n_calib, args.n_eval)
        shapes = {k: v["shape"] for k, v in meta["splits"]["calib"]["arrays"].items()}
        check = meta["splits"]["eval"].get("check", {})
        keys = [k for k in check if not k.startswith("output") and k != "examples"]
        extra = "  ".join(f"{k}={check[k]}" for k in keys)
        print(f"{name:<18} {Path(meta['splits']['calib']['path']).parent}  {shapes}  {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
