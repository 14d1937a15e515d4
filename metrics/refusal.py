"""Rule-based refusal detection: did a response decline to answer, and does it name the missing element.

`is_refusal` is the default "refused?" judge of docs/design.md section 6; `reason_ok` checks that a refusal
names the object, relation or attribute that the question presupposed and the video lacks.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["content_tokens", "is_refusal", "reason_ok"]

# How the detector works (each rule exists because of a known failure of keyword matching):
#  1. Text is lower-cased, curly quotes are straightened, and every quoted span ("...", '...', “...”)
#     becomes the placeholder word "quoted": a "cannot" inside a quotation is content, not the model
#     declining, while 'there is no "kettle" in the video' keeps its shape.
#  2. STRONG patterns say that the question cannot be answered ("unanswerable", "cannot be answered",
#     "I cannot determine", "impossible to tell", "not enough information", "false premise"). They count
#     in any sentence.
#  3. WEAK patterns deny that something is in the video ("the video does not show", "there is no X in
#     the video", "X is not visible in the video"). They count only in the first sentence (after an
#     apology or interjection), so a caveat after an answer ("He runs. The video does not show where he
#     goes.") is not a refusal, and not when the response opens with a yes/no answer: "No, there is no
#     dog in the video." answers "Is there a dog?".
#  4. A match is ignored when it is the content of reported speech or writing ("the teacher says the
#     question is unanswerable", "the sign reads ..."), or a relative clause ("a riddle that cannot be
#     answered").
#  5. A STRONG first-person/impersonal match or a WEAK match is ignored when the same sentence goes on
#     to answer anyway ("I can't tell exactly, but it looks like a golden retriever").
#  6. "None, as/because ..." (a count of zero justified by a reason) rejects the premise: a refusal.
#     A bare "None." is an answer.
# The labelled table tests/metrics/refusal_cases.tsv and the 467 UVQA refusals measure it; run
# `python -m metrics.refusal_eval`.

_MEDIA = r"(?:video|clip|footage|scene|scenes|frames?|images?|recording|visuals?|content|sequence)"
_NEG = r"(?:does\s+not|doesn't|did\s+not|didn't|do\s+not|don't|never|cannot|can't|can\s+not|fails?\s+to)"
_CANT = (
    r"(?:cannot|can\s+not|can't|could\s+not|couldn't|am\s+unable\s+to|'m\s+unable\s+to|are\s+unable\s+to|"
    r"am\s+not\s+able\s+to|'m\s+not\s+able\s+to|are\s+not\s+able\s+to|do\s+not|don't|did\s+not|didn't|"
    r"have\s+no\s+way\s+to|am\s+not\s+in\s+a\s+position\s+to)"
)
_KNOW_VERBS = (
    r"(?:determine|tell|answer|say|know|identify|confirm|infer|judge|verify|ascertain|specify|provide|"
    r"describe|comment|discern|assess|access|view|watch|be\s+sure|be\s+certain|give|deduce|establish|"
    r"decide|conclude|guess|predict|estimate|explain|speculate|state|work\s+out|figure\s+out|"
    r"make\s+out|see\s+(?:what|who|which|whether|if|how|where|why))"
)
_SEE_VERBS = r"(?:see|find|spot|locate|detect|notice|observe|recogni[sz]e)"
_THERE_BE = r"there(?:\s+(?:is|are|was|were)|'s|'re)"
# "there is no X", "there isn't any X", "there doesn't seem to be a X"
_THERE_NO = (
    r"there(?:\s+(?:is|are|was|were)|'s|'re)\s+(?:no|not\s+any|not\s+a|not\s+an|nothing|nobody|no\s+one|none)"
    r"|there\s+(?:isn't|aren't|wasn't|weren't)\s+(?:any|a|an)"
    r"|there\s+(?:does\s+not|doesn't|do\s+not|don't|did\s+not|didn't)\s+(?:seem|appear)\s+to\s+(?:be|have\s+been)"
    r"\s+(?:any|a|an|no)"
)
_I = r"\b(?:i|we)(?:\s+|(?='))"
_PASSIVE = (
    r"(?:determined|identified|known|ascertained|inferred|confirmed|told|verified|established|answered|"
    r"deduced|judged|assessed|said|discerned|specified|concluded|stated|provided)"
)
_SHOWN = (
    r"(?:visible|present|shown|seen|depicted|featured|mentioned|included|observed|found|evident|captured|"
    r"displayed|portrayed|pictured|there|available|apparent|noticeable)"
)

_STRONG = [
    # the question is unanswerable / cannot be answered / has no answer
    r"\bun-?answerable\b",
    r"\bnot\s+answerable\b",
    r"\b(?:cannot|can\s+not|can't|could\s+not|couldn't|can\s+never)\s+(?:really\s+|possibly\s+)?be\s+answered\b",
    r"\b(?:impossible|not\s+possible|no\s+way)\s+to\s+(?:be\s+)?answer(?:ed)?\b",
    r"\bquestion\s+(?:has|have)\s+no\s+(?:valid\s+|clear\s+|definitive\s+)?answer\b",
    r"\b(?:false|incorrect|invalid|mistaken|wrong|faulty|flawed)\s+(?:premise|presupposition|assumption)\b",
    r"\bpremise\s+(?:of\s+the\s+question\s+)?(?:is|seems|appears)\s+(?:to\s+be\s+)?(?:false|incorrect|wrong|invalid)",
    r"\bquestion\s+(?:\w+\s+){0,3}?(?:presupposes|assumes|presumes)\b",
    r"\b(?:not|no)\s+(?:enough|sufficient)\s+(?:information|info|detail|details|context|evidence|visual)",
    r"\binsufficient\s+(?:information|detail|details|context|evidence|visual)",
    r"\b(?:provides?|gives?|offers?|contains?|has|there\s+is|there's)\s+no\s+(?:information|indication|"
    r"details?|clues?|evidence|mention|basis)\b",
]
# Epistemic refusals: strong, but an answer may follow in the same sentence ("..., but it looks red").
_HEDGEABLE_STRONG = [
    _I + _CANT + r"\s+(?:\w+\s+){0,2}?" + _KNOW_VERBS + r"\b",
    _I + r"(?:do\s+not|don't|did\s+not|didn't)\s+have\s+(?:enough\s+|sufficient\s+|any\s+)?"
    r"(?:information|access|the\s+ability|details|context|a\s+way)",
    r"\b(?:it|this|that)\s+(?:is|was|'s|remains|seems|appears)\s+(?:\w+\s+)?(?:not\s+possible|impossible|"
    r"unclear|not\s+clear|uncertain|unknown|not\s+known|difficult|hard|not\s+evident|not\s+apparent)\s*"
    r"(?:to\s+(?:\w+\s+)?" + _KNOW_VERBS + r"|from\s+the\s+" + _MEDIA + r"|(?:what|who|which|whether|if|how|"
    r"where|why|when)\b|$|[,.;:])",
    r"\b(?:it\s+is\s+|it's\s+|it\s+isn't\s+)?(?:not\s+possible|impossible|possible|difficult|hard|no\s+way)\s+"
    r"to\s+(?:\w+\s+)?" + _KNOW_VERBS + r"\b",
    r"\b(?:making|makes|made|leaving)\s+it\s+(?:impossible|difficult|hard|not\s+possible|unclear)\b",
    r"\b(?:cannot|can\s+not|can't|could\s+not|couldn't|can\s+never)\s+(?:really\s+|possibly\s+)?be\s+"
    + _PASSIVE
    + r"\b",
    r"\b" + _MEDIA + r"\s+(?:\w+\s+)?(?:does\s+not|doesn't|did\s+not|didn't)\s+make\s+(?:it\s+)?clear\b",
    _I + r"(?:am|'m|are|'re)\s+not\s+(?:sure|certain)\b",
    r"^(?:cannot|can't|unable\s+to|not\s+possible\s+to|impossible\s+to|hard\s+to|difficult\s+to)\s+"
    + _KNOW_VERBS
    + r"\b",
    r"^(?:unknown|unclear|not\s+sure|uncertain|n/?a|not\s+applicable|no\s+answer|unable\s+to\s+tell)\b",
]
_WEAK = [
    # the video does not show / feature / contain ...
    r"\b"
    + _MEDIA
    + r"\s+(?:provided\s+|shown\s+|given\s+|itself\s+|clip\s+)?(?:\w+\s+)?"
    + _NEG
    + r"\s+(?:\w+\s+){0,2}?(?:show|depict|feature|contain|include|display|mention|reveal|present|capture|"
    r"have|indicate|portray|provide|offer|specify|clarify|suggest)\b",
    r"\b" + _MEDIA + r"\s+(?:only\s+)?(?:lacks|contains\s+no|shows\s+no|has\s+no|features\s+no|includes\s+no|"
    r"depicts\s+no|provides\s+no|never\s+shows)\b",
    # there is no X in the video / there is no X visible
    r"\b(?:" + _THERE_NO + r")\b(?P<thing>[^,;:]{0,80}?)"
    r"\b(?:in|within|throughout|on|from|inside)\s+(?:the|this|that|these|any)\s+(?:\w+\s+)?" + _MEDIA + r"\b",
    r"\b(?:" + _THERE_NO + r")\b(?P<thing>[^,;:]{0,80}?)\b" + _SHOWN + r"\b",
    r"\bnowhere\s+to\s+be\s+(?:seen|found)\b",
    r"\b" + _MEDIA + r"\s+(?:\w+\s+){0,2}?(?:only\s+)?(?:shows?|contains?|has|features?|depicts?|includes?)\b"
    r"[^;.]*?,\s*(?:but\s+|and\s+)?(?:no|not\s+any)\s+\w+",
    r"\b" + _THERE_BE + r"\s+(?:no|not\s+any)\s+(?:such|\w+\s+like\s+that)\b",
    r"\b" + _THERE_BE + r"\s+(?:no|not\s+any)\s+(?:\w+\s+){0,6}?(?:in|within)\s+(?:the\s+)?"
    r"(?:question|quoted)\b",
    # a short "There is no bicycle." or "There is no green triangle, so ..."
    r"(?:^|\bin\s+the\s+"
    + _MEDIA
    + r",?\s+)(?:"
    + _THERE_NO
    + r")(?P<thing>(?:\s+(?!(?:on|in|at|for|to|with|"
    r"about|of|from|by|near)\b)\w+){1,3})\s*(?:[.;,!]|$)",
    # no X is visible / appears in the video
    r"(?:^|\b(?:but|and|so|as|since|because)\s+)(?:no|not\s+a\s+single)\s+(?:\w+\s+){1,6}?(?:is|are|was|were|"
    r"can\s+be|could\s+be)\s+(?:\w+\s+)?" + _SHOWN + r"\b",
    r"(?:^|\b(?:but|and|so|as|since|because)\s+)(?:no|not\s+a\s+single)\s+(?:\w+\s+){1,6}?(?:appears?|occurs?|"
    r"exists?|happens?|takes?\s+place)\b",
    r"\b(?:nothing|nobody|no\s+one)\s+(?:in|within)\s+the\s+" + _MEDIA + r"\s+(?:shows|suggests|indicates|"
    r"depicts|matches)\b",
    r"\bno\s+such\s+\w+",
    r"\bat\s+no\s+point\s+(?:in|during|throughout)\s+the\s+" + _MEDIA + r"\b",
    # X is not visible / present / shown (in the video)
    r"\b(?:(?:is|are|was|were|'s|'re)\s+(?:not|never|nowhere)|isn't|aren't|wasn't|weren't)\s+(?:\w+\s+)?"
    + _SHOWN
    + r"(?:\s+(?:at\s+any\s+point\s+|anywhere\s+|at\s+all\s+)?(?:in|within|throughout|on|during)\s+"
    r"(?:the|this)\s+(?:\w+\s+)?" + _MEDIA + r"|\s+anywhere|\s+at\s+all|\s*[;:.,]|\s*$)",
    r"\b(?:is|are|isn't|aren't|was|were)\s+(?:not\s+)?(?:absent|missing)\s+(?:from|in)\s+(?:the|this)\s+"
    + _MEDIA
    + r"\b",
    r"\b(?:does\s+not|doesn't|do\s+not|don't|did\s+not|didn't|never)\s+(?:seem\s+to\s+|appear\s+to\s+)?"
    r"(?:appear|exist|occur|happen|take\s+place|show\s+up|feature|come\s+up)s?\s+(?:\w+\s+)?(?:in|within|"
    r"throughout|on|during)\s+(?:the|this|that)\s+(?:\w+\s+)?" + _MEDIA + r"\b",
    r"\b(?:(?:is|are|was|were)\s+not|isn't|aren't|wasn't|weren't)\s+(?:in|part\s+of)\s+(?:the|this)\s+"
    + _MEDIA
    + r"\b",
    _I
    + r"(?:do\s+not|don't)\s+(?:think|believe)\s+(?:that\s+)?(?:(?:the|this)\s+"
    + _MEDIA
    + r"\s+(?:shows|contains|features|depicts|includes|has)|there\s+(?:is|are)\s+(?:a|an|any)"
    r"|there's\s+(?:a|an|any))\b",
    _I + _CANT + r"\s+(?:\w+\s+){0,2}?" + _SEE_VERBS + r"\b",
    r"\bnot\s+(?:shown|depicted|visible|present|featured|mentioned|included|captured)\s+(?:at\s+all\s+)?"
    r"(?:in|within|throughout)\s+(?:the|this)\s+(?:\w+\s+)?" + _MEDIA + r"\b",
]
_STRONG_RE = [re.compile(p) for p in _STRONG]
_HEDGEABLE_RE = [re.compile(p) for p in _HEDGEABLE_STRONG]
_WEAK_RE = [re.compile(p) for p in _WEAK]

# "There is no doubt ...": idioms in which "there is no X" says nothing about the video.
_IDIOMS = re.compile(
    r"^\s*(?:doubt|question\s+(?:that|about\s+it)|denying|mistaking|telling\s+(?:what|how|whether)|way\s+(?:that|the|he|"
    r"she|it|they)|need|reason|hurry|rush|point|time\s+to|problem|problems|harm|excuse|wonder|end\s+to|one\s+else|"
    r"other|shortage|lack|limit|sign\s+of\s+(?:stopping|slowing))\b"
)
# Reported speech or writing: a match that is the complement of one of these verbs is content.
_REPORTING = re.compile(
    r"\b(?:says?|said|saying|tells?|told|telling|explains?|explained|explaining|states?|stated|stating|reads?|"
    r"reading|writes?|wrote|written|shouts?|shouted|asks?|asked|claims?|claimed|announces?|announced|replies|"
    r"replied|yells?|yelled|whispers?|whispered|sings?|sang|argues?|argued|insists?|insisted|complains?|"
    r"complained|admits?|admitted|jokes?|joked|titled|labell?ed|captioned|displays?|displaying|repeats?|"
    r"exclaims?|exclaimed|declares?|declared|warns?|warned|notes?|noted|agrees?|agreed|realizes?|realises?|"
    r"thinks?|thought|believes?|believed|learns?|learned|discovers?|discovered|shows?\s+that|showing\s+that)\b"
    r"(?:\s+(?:to\s+)?(?:him|her|them|us|me|everyone|the\s+\w+))?\s*(?:,\s*|:\s*|that\s+)?(?:[\w']+\s+){0,4}$"
)
_RELATIVE = re.compile(r"\b(?:that|which|who)\s+(?:is\s+|are\s+|was\s+|were\s+|seems\s+|looks\s+)?$")
# The same sentence goes on to answer ("..., but it looks like a golden retriever").
_ANSWERS_ANYWAY = re.compile(
    r"\b(?:but|though|although|however|yet)\b.*\b(?:looks?|seems?|appears?\s+to|probably|likely|possibly|perhaps|"
    r"maybe|might|my\s+best\s+guess|i\s+think|i\s+believe|i\s+guess|(?:he|she|it|they|the\s+\w+)\s+(?:is|are|was|"
    r"were|has|have|wears|holds|keeps|enters|seems))\b"
)
_YES_NO = re.compile(r"^(?:yes|yeah|yep|yup|no|nope|correct|incorrect|true|false)(?:\s*[,.!;:\-]|$)")
_NONE_BECAUSE = re.compile(r"^none\s*[,.;:\-]*\s*(?:as|because|since|given)\b")
_PREAMBLE = re.compile(
    r"^(?:i'm\s+sorry|i\s+am\s+sorry|sorry|apologies|i\s+apologi[sz]e|unfortunately|hmm+|well|okay|ok|"
    r"none|answer|response|actually|alas)[\s,.!:;\-]*$"
)
_APOLOGY = re.compile(
    r"^(?:i'm\s+sorry|i\s+am\s+sorry|sorry|unfortunately|i\s+apologi[sz]e)[\s,]*(?:but\s+)?"
)
# "There is no one else in the video besides the chef" describes what is there.
_EXCEPT = re.compile(r"\b(?:else|besides|except|apart\s+from|aside\s+from|other\s+than)\b")
_QUOTES = re.compile(r"\"[^\"\n]{0,300}?\"|(?<![\w])'(?:[^'\n]|(?<=\w)'(?=\w)){1,300}?'(?![\w])")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+|(?<=[a-z])\s*:\s+(?=[a-z])")


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = (
        text.replace("\u2019", "'")
        .replace("\u2018", "'")
        .replace("\u201c", '"')
        .replace("\u201d", '"')
        .replace("\u00ab", '"')
        .replace("\u00bb", '"')
        .replace("`", "'")
    )
    text = _QUOTES.sub(" quoted ", text.lower())
    return re.sub(r"[ \t]+", " ", text).strip()


def _sentences(text: str) -> list[str]:
    return [s.strip(" -*\t") for s in _SENTENCE_SPLIT.split(text) if s and s.strip(" -*\t")]


def _counts(match: re.Match[str], sentence: str, strong: bool) -> bool:
    """Whether a pattern match is the speaker's own statement, not reported or described content."""
    before = sentence[: match.start()]
    if _REPORTING.search(before) or (strong and _RELATIVE.search(before)):
        return False
    thing = match.groupdict().get("thing")
    return not (thing is not None and _IDIOMS.match(thing))


def _first_match(patterns: list[re.Pattern[str]], sentence: str, strong: bool = True) -> re.Match[str] | None:
    for pattern in patterns:
        for match in pattern.finditer(sentence):
            if _counts(match, sentence, strong):
                return match
    return None


def _hedged(match: re.Match[str], sentence: str) -> bool:
    return bool(_ANSWERS_ANYWAY.search(sentence[match.end() :]))


def is_refusal(text: str) -> bool:
    """Whether a response declines to answer (rule-based; see the notes at the top of this module).

    >>> is_refusal("The question is unanswerable because there is no green triangle in the video.")
    True
    >>> is_refusal("I'm sorry to hear that.")
    False
    >>> is_refusal("There is no doubt the man is running.")
    False
    >>> is_refusal('The man holds a sign that says "I cannot swim".')
    False

    An empty response is not a refusal (it declines nothing; it is simply not a correct answer).
    """
    norm = _normalise(text)
    if not norm:
        return False
    sentences = _sentences(norm)
    if not sentences:
        return False
    if _NONE_BECAUSE.match(sentences[0]):
        return True
    for sentence in sentences:
        if _first_match(_STRONG_RE, sentence):
            return True
        match = _first_match(_HEDGEABLE_RE, sentence)
        if match and not _hedged(match, sentence):
            return True
    # Weak (absence) patterns: first sentence after any apology or interjection only.
    while len(sentences) > 1 and _PREAMBLE.match(sentences[0]):
        sentences = sentences[1:]
    first = sentences[0]
    if _YES_NO.match(first):
        return False
    first = _APOLOGY.sub("", first)
    if _EXCEPT.search(first):
        return False
    match = _first_match(_WEAK_RE, first, strong=False)
    return bool(match) and not _hedged(match, first)


# ---------------------------------------------------------------------------------------------------------
# reason_ok: does the refusal name the missing element?

_STOPWORDS = frozenset(
    "a an the of some any this that these those to is are be been being was were it its there their his her "
    "and or in on at by with from into onto as".split()
)
# The words that carry a relation's meaning ("left", "above", "behind", "under") are kept; the common
# prepositions above are dropped because their wording varies freely ("on top of" ~ "on", "into" ~ "in").
# Number words as digits: shared with the judges' answer normalisation (metrics.judges).
NUMBER_WORDS = {
    "zero": "0",
    "none": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
}
_NUMBERS = {**NUMBER_WORDS, "no": "0"}  # "there is no dog" names zero dogs
_SPELLING = {
    "colour": "color",
    "grey": "gray",
    "centre": "center",
    "theatre": "theater",
    "favourite": "favorite",
}
_IRREGULAR_PLURALS = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
    "knives": "knife",
    "leaves": "leaf",
    "wolves": "wolf",
    "shelves": "shelf",
    "lives": "life",
    "wives": "wife",
    "halves": "half",
    "loaves": "loaf",
    "calves": "calf",
}


def _stem(word: str) -> str:
    """A tiny suffix stripper: the same word in another number or tense maps to the same stem."""
    word = _SPELLING.get(word, word)
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if len(word) <= 3:
        return word
    for suffix, repl in (
        ("ies", "y"),
        ("sses", "ss"),
        ("xes", "x"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("zes", "z"),
        ("oes", "o"),
    ):
        if word.endswith(suffix) and len(word) - len(suffix) >= 2:
            return word[: -len(suffix)] + repl
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) >= 3 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # running -> run, stopped -> stop
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]  # moving/move -> mov, raced/race -> rac
    return word


def content_tokens(text: str) -> list[str]:
    """Lower-cased, stemmed content words of a text (articles and a few function words dropped)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    words = re.findall(r"[a-z0-9]+", text.replace("'s ", " ").replace("-", " "))
    out = []
    for word in words:
        if word in _STOPWORDS:
            continue
        out.append(_NUMBERS.get(word, _stem(word)))
    return out


def reason_ok(text: str, missing_element: str | None) -> bool:
    """Whether a response names the missing element: every content word of it occurs in the response.

    Tolerant of case, plurals and tense, word order, articles and quotes. An empty or absent missing
    element cannot be checked and gives False. It does not check that the response is a refusal.

    >>> reason_ok("The question is unanswerable because there are no green triangles in the video.",
    ...           "a green triangle")
    True
    >>> reason_ok("There is no triangle in the video.", "green triangle")
    False
    """
    if not text or not missing_element:
        return False
    needed = content_tokens(missing_element)
    if not needed:
        return False
    present = set(content_tokens(text))
    return all(token in present for token in needed)
