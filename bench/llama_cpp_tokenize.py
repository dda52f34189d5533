#!/usr/bin/env python3
"""Writes daemon/tests/fixtures/tokenizer_llamacpp.json: a long, varied text and llama.cpp's
token ids for it, so the daemon's tokenizer test can compare ours with llama.cpp's token for token.

llama.cpp comes from PyPI `llama-cpp-python`, which compiles llama.cpp when installed (10+ minutes
on 2 cores), so this script is run by hand, never by `make test`; keep it in its own venv:

    python3 -m venv /tmp/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        /tmp/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36
    /tmp/llamacpp-venv/bin/python bench/llama_cpp_tokenize.py [--model PATH] [--out PATH]

The model defaults to $SKILLKV_MODEL, then ~/.cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf
(`make model`). Only the vocabulary is loaded (`vocab_only=True`).
"""

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path.home() / ".cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO / "daemon/tests/fixtures/tokenizer_llamacpp.json"

ENGLISH = """\
Skills are prompt modules: a SKILL.md file holds instructions that a model reads before the
conversation starts. Because the same skill is sent with thousands of requests, its key/value
cache is computed once, pinned, and reused. It's cheap; they're fast; we'll see, won't we? I'd
say you've done it, and I'm sure she'll agree. "Quoted text", 'single quotes', (parentheses),
[brackets], {braces}, <angle brackets>, and -- dashes -- or — em dashes — and … ellipses.
THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. the quick brown fox jumps over the lazy dog!
Mr. O'Neil's co-operative re-entry: e-mail, self-hosted, state-of-the-art, well-known.
"""

CODE = '''\
```rust
/// Returns the longest prefix of `tokens` that is cached.
pub fn lookup(&self, tokens: &[u32]) -> Option<(usize, Vec<BlockId>)> {
    let mut node = self.root;
    for chunk in tokens.chunks_exact(BLOCK_SIZE) {
        match self.children.get(&(node, hash(chunk))) {
            Some(&child) => node = child,
            None => break,
        }
    }
    if node == self.root { None } else { Some((self.depth(node) * 16, self.blocks(node))) }
}
```

```python
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out

if __name__ == "__main__":
    print(fibonacci(20))  # [0, 1, 1, 2, 3, 5, 8, 13, ...]
```

    $ kubectl get skills -n prod --output=wide | grep -E '^(READY|pdf-)' && echo "ok" || exit 1
    {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": true}
    SELECT id, name FROM users WHERE created_at >= '2026-01-01' AND score > 0.75 ORDER BY id;
'''

NUMBERS = """\
Numbers: 0 1 2 3 42 007 1234567890 3.14159265358979 -0.001 6.022e23 1e-9 0x1F 0b1010 0o777
1,000,000 and 1.000.000 and 1 000 000; 12:30:45 on 2026-11-22T02:36:21Z; +1 (555) 010-9999.
Versions v1.2.3, 10.0.0.1/24, port 8080, 99.9% uptime, $19.99, €5, £3, ¥1000, 2^32 = 4294967296.
Roman IV, XII; ordinals 1st 2nd 3rd 4th 21st 101st; fractions ½ ¾ ⅓; superscripts x² y³.
"""

UNICODE = """\
Français : « Où est la bibliothèque ? » Ça coûte très cher, n'est-ce pas ? Déjà vu, naïve café.
Deutsch: Größenänderung, Fußgängerübergänge, Äpfel, Öl, Übermut — straße vs. STRASSE.
Español: ¿Dónde está el niño? ¡Qué año! Português: ação, coração, não. Polski: zażółć gęślą jaźń.
Ελληνικά: Καλημέρα κόσμε, ψυχή. Русский: Съешь же ещё этих мягких французских булок, да выпей чаю.
עברית: שלום עולם. العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก. Tiếng Việt: Xin chào thế giới.
Math: ∀x ∈ ℝ, ∃y: x² + y² ≥ 2xy; ∑ᵢ aᵢ ≤ ∞; ∫₀¹ f(x) dx ≈ 0.5; α β γ δ ε → ⇒ ⇔ ≠ ≡ ∅ ∩ ∪.
Symbols: © ® ™ § ¶ † ‡ • ° ± × ÷ µ ← ↑ → ↓ ♠ ♣ ♥ ♦ ★ ☆ ✓ ✗ ☃ ☂ ♪ ♫ ⌘ ⌥ ⏎.
"""

EMOJI = """\
Emoji: 😀 😃 😄 😁 🤣 😂 🙂 🙃 😉 😊 🥰 😍 🤩 😘 🤔 🤨 😐 🙄 😏 😴 🤯 🥳 😎 🤓 🧐 😕 😟 😮 😢 😭 😱 😡 🤬 💀 👻 👽 🤖 💩.
Hands and people: 👍 👍🏻 👍🏿 👋🏽 🙏 👏 💪 👩‍💻 👨‍👩‍👧‍👦 🧑‍🚀 🏳️‍🌈 🏴‍☠️ ❤️ 🧡 💛 💚 💙 💜 🖤 🤍 💔 ❣️.
Things: 🦀 🐍 🐳 🚀 🛰️ 🔥 ✨ ⚡ 🌍 🌈 ☀️ 🌙 ⭐ 🍕 🍣 ☕ 🍺 🎉 🎁 📦 🔒 🔑 🧪 🧬 📈 📉 🗂️ 🖥️ ⌨️ 🖱️.
Flags: 🇫🇷 🇩🇪 🇯🇵 🇺🇸 🇧🇷 🇮🇳 🇨🇳 🇰🇷 🇺🇦 🇪🇺. Keycaps: 1️⃣ 2️⃣ #️⃣ *️⃣. Mixed: abc🦀def🚀123🔥xyz.
"""

CJK = """\
中文：大型语言模型的推理需要缓存键值对，以便重复使用相同的前缀。技能是提示模块，每个节点只计算一次。
今天天气很好，我们去公园散步吧！这个问题的答案是四十二。《三体》是一本科幻小说。
日本語：吾輩は猫である。名前はまだ無い。東京都渋谷区、カタカナ、ひらがな、ｶﾀｶﾅ（半角）。
한국어: 안녕하세요, 세계! 대규모 언어 모델은 키-값 캐시를 사용합니다. 감사합니다.
Full-width: ＡＢＣ１２３！？ and mixed 混合text与English词语123个。
"""

WHITESPACE = (
    "Whitespace runs:  two  spaces,   three   spaces,    four    spaces.\n"
    "\tTab-indented line\n\t\tDouble tab\n  \t  mixed tabs and spaces\t\t\n"
    "Trailing spaces here   \n\n\nThree newlines above.\r\nWindows line ending.\r\n"
    "                                        forty spaces before this.\n"
    "\n \n  \n   \nlines of only spaces above\u00a0non-breaking\u2003em space\u200bzero width.\n"
)

CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 17 × 23? Show your work.<|im_end|>\n"
    "<|im_start|>assistant\n17 × 23 = 17 × 20 + 17 × 3 = 340 + 51 = 391.<|im_end|>\n"
    "<|im_start|>user\nThanks!<|im_end|><|im_start|>assistant\nYou're welcome! 😊<|im_end|>\n"
    "<|endoftext|><repo_name>skillkv/skillkv<file_sep>daemon/src/main.rs<filename>x.py"
    "<gh_stars>1000<issue_start>bug<issue_comment>fixed<issue_closed><jupyter_start>"
    "<jupyter_text>notes<jupyter_code>print(1)<jupyter_output>1<empty_output><jupyter_script>\n"
    "Text right against tokens:<|im_start|><|im_end|>x<|im_end|>y <|im_start|> z\n"
    "Look-alikes that are not special: <|im_start |> <im_start> <|IM_END|> |im_end| <|im_end\n"
)


def build_text() -> str:
    sections = [ENGLISH, CODE, NUMBERS, UNICODE, EMOJI, CJK, WHITESPACE, CHATML]
    # Two passes in different orders, so sections also meet each other's edges.
    return "".join(sections) + "\n" + "".join(reversed(sections))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_default = os.environ.get("SKILLKV_MODEL") or str(DEFAULT_MODEL)
    parser.add_argument("--model", default=model_default, help="GGUF file (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="fixture to write (default: %(default)s)")
    args = parser.parse_args()

    if not Path(args.model).is_file():
        print(f"model not found: {args.model} (run `make model`)", file=sys.stderr)
        return 1
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not installed; see this script's docstring", file=sys.stderr)
        return 1

    llm = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    text = build_text()
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    fixture = {
        "generator": "bench/llama_cpp_tokenize.py",
        "llama_cpp_python": llama_cpp.__version__,
        "model": Path(args.model).name,
        "text": text,
        "tokens": tokens,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One key per line, the token list on one line: small and diff-friendly.
    body = ",\n".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in fixture.items())
    out.write_text("{\n" + body + "\n}\n", encoding="utf-8")
    print(f"wrote {out}: {len(tokens)} tokens for {len(text)} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
