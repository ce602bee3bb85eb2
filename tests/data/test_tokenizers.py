"""Tokenizer round trips and serialisation."""

import numpy as np
import pytest

from seqmix.data import tokenizers


def test_byte_round_trip_unicode():
  tok = tokenizers.ByteTokenizer()
  text = "héllo, wörld — ☃\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 256
  assert len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.vocab_size == 256


def test_byte_decode_replaces_out_of_range_ids():
  assert tokenizers.ByteTokenizer().decode([104, 300, -1, 105]) == "h\ufffd\ufffdi"


def test_char_round_trip_and_sorted_vocab():
  text = "to be, or not to be"
  tok = tokenizers.CharTokenizer.from_text(text)
  assert tok.chars == tuple(sorted(set(text)))
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids[:2], [tok.chars.index("t"), tok.chars.index("o")])
  assert tok.decode(ids) == text


def test_char_non_bmp_characters():
  text = "a𝄞b"
  tok = tokenizers.CharTokenizer.from_text(text)
  assert tok.decode(tok.encode(text)) == text and tok.vocab_size == 3


def test_char_unknown_character_message():
  tok = tokenizers.CharTokenizer.from_text("abc")
  with pytest.raises(ValueError, match=r"\['z'\].*not in the vocabulary"):
    tok.encode("abz")


@pytest.mark.parametrize("tok", [tokenizers.ByteTokenizer(),
                                 tokenizers.CharTokenizer.from_text("xyz\n")])
def test_json_round_trip(tok):
  again = tokenizers.tokenizer_from_json(tok.to_json())
  assert again == tok and type(again) is type(tok)


def test_make_tokenizer_unknown():
  with pytest.raises(ValueError, match="one of"):
    tokenizers.make_tokenizer("bpe")
