import pytest

from batching.languages import CHAR_LIMITS, SUPPORTED_LANGUAGES, normalize_language
from batching.errors import UnsupportedLanguageError
from batching.text import split_text


def test_the_seed_languages_and_hindi_are_supported():
    seed = "pt en es fr de it pl tr ru nl cs ar zh-cn ja hu ko".split()
    assert set(SUPPORTED_LANGUAGES) == set(seed) | {"hi"}
    assert set(CHAR_LIMITS) == set(SUPPORTED_LANGUAGES)


def test_language_codes_are_normalized():
    assert normalize_language("PT") == "pt"
    assert normalize_language(" zh-CN ") == "zh-cn"
    assert normalize_language("zh_cn") == "zh-cn"


@pytest.mark.parametrize("code", ["pt-BR", "xx", "", None, 3, "zh"])
def test_unsupported_language_names_the_code_and_lists_the_supported(code):
    with pytest.raises(UnsupportedLanguageError) as err:
        normalize_language(code)
    assert repr(code) in str(err.value)
    assert "pt, en, es" in str(err.value)
    assert err.value.error_code == "unsupported_language"


def test_short_text_is_one_segment():
    assert split_text("  Olá,   mundo!  ", "pt") == ["Olá, mundo!"]


def test_blank_text_has_no_segments():
    assert split_text(" \n\t ", "en") == []


@pytest.mark.parametrize("language", SUPPORTED_LANGUAGES)
def test_long_text_respects_the_language_limit_and_keeps_every_word(language):
    sentence = "This is sentence number {} of a long paragraph, with a clause. "
    text = "".join(sentence.format(i) for i in range(40))
    segments = split_text(text, language)
    assert len(segments) > 1
    assert all(0 < len(s) <= CHAR_LIMITS[language] for s in segments)
    assert " ".join(segments).split() == text.split()


def test_sentences_are_kept_whole_and_merged_up_to_the_limit():
    text = "First sentence here. Second one! Third? " * 20
    segments = split_text(text, "en", limit=60)
    assert all(len(s) <= 60 for s in segments)
    assert all(s.endswith((".", "!", "?")) for s in segments)
    assert segments[0] == "First sentence here. Second one! Third? First sentence here."  # 60 chars


def test_cjk_text_without_spaces_is_split_at_sentence_marks_and_hard_wrapped():
    text = "今天天气很好。我们去公园散步吧！" * 10 + "长" * 200
    segments = split_text(text, "zh-cn")
    assert all(0 < len(s) <= CHAR_LIMITS["zh-cn"] for s in segments)
    assert "".join(segments).replace(" ", "") == text
    assert segments[0].endswith(("。", "！"))


def test_a_word_longer_than_the_limit_is_cut():
    segments = split_text("a" * 500, "en")
    assert [len(s) for s in segments] == [250, 250]


def test_devanagari_danda_ends_a_sentence():
    text = "यह एक वाक्य है। " * 30
    segments = split_text(text, "hi")
    assert all(s.endswith("।") for s in segments)
    assert all(len(s) <= CHAR_LIMITS["hi"] for s in segments)
