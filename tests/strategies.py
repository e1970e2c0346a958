"""Hypothesis strategies shared by the decoder properties: text as a network peer sends it."""

from __future__ import annotations

from hypothesis import strategies as st

# Any Unicode a UTF-8 encoder accepts (no lone surrogates): digits of every script,
# superscripts ("²" passes str.isdigit() but not int()), controls, line breaks.
wire_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)

# Digits of many scripts: str.isdigit() passes all, int() only some, ASCII-only parsers none.
digits = st.text(
    st.sampled_from("0123456789\u00b2\u00b3\u00b9\u0663\u06f2\u0967\uff11\U0001d7d9"),
    min_size=1,
    max_size=6,
)

# Text biased towards what parsers look at: digits, signs, separators, quotes, brackets.
tricky_text = st.one_of(
    wire_text,
    digits,
    st.text(st.sampled_from("0123456789\u00b2\u0663\uff11+-.:; \t\"'<>/#=*\r\n"), max_size=20),
    st.integers(-(2**70), 2**70).map(str),
)
