"""The built-in synthetic speech corpus: seeded sentences spoken by eSpeak NG voices.

Real corpora are large downloads; this module makes a small, fully reproducible stand-in
(~2 hours of training audio, generated in well under two minutes) in LibriSpeech layout::

    <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   "<ID> <TRANSCRIPT>" lines
    <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac   16 kHz mono 16-bit

Four splits: ``train``, ``dev`` and ``test`` use the same *seen* voices; ``test-unseen`` uses
*held-out* voices that never occur in the other three.  No sentence occurs in two splits.

* Text: a tiny template grammar over word classes (:data:`WORD_CLASSES`: ~700 listed words,
  ~940 with the derived plurals and verb forms) makes
  5-14 word sentences such as "THE OLD BAKER CARRIED A BASKET ACROSS THE BRIDGE", so that
  eSpeak's prosody is that of ordinary sentences.  Transcripts use only ``A-Z``, ``'`` and
  spaces: the character vocabulary of wav2vec2's English CTC heads.
* Voices: an eSpeak NG voice is ``"<accent>+<variant>"`` (e.g. ``"en-us+m3"``).  Speaker id
  = index in :data:`VOICES`.  Per utterance the speaking rate and pitch are jittered.
* Synthesis: eSpeak NG 1.52 from the pinned ``espeakng-loader`` wheel, driven through ctypes.
  Its output depends on hidden global state, of two kinds:

  - state that keeps running across utterances (e.g. a ``static`` pitch-flutter index in
    ``wavegen.c``): so each utterance is synthesised in a freshly forked child process, which
    starts from the parent's pristine library state;
  - two random number generators.  ``espeak_ng_Initialize`` seeds eSpeak's own generator
    (``espeak_rand``, used for the "breath" noise of the variants ``f2`` and ``sandro``;
    the Klatt code calls it too, but klatt2/klatt3 output measured the same under any seed)
    with ``time(NULL)``, so those voices changed from one build to the next (680 of 3,656
    files in the default corpus); the ``klatt 6`` speech-player voices
    (``caleb``) draw from the C library's ``rand()``, which any other code in the process
    may advance.  So the child re-seeds both (:func:`utterance_seed`) right before it
    synthesises.

  The result is a pure function of (text, voice, rate, pitch), independent of the time,
  of what was synthesised before and of the number of worker processes.  ``os.fork`` makes
  this POSIX-only (Linux, macOS).
* Reproducibility: every utterance's text, voice, rate and pitch are drawn up front from
  ``numpy.random.default_rng`` streams seeded by ``(seed, split)``; same settings and same
  ``espeakng-loader`` version give bit-identical audio (on one machine; on another CPU, float
  rounding in the resampler could in principle flip a rare least significant bit).

Entry point: :func:`build_corpus` (generates once, then reuses).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spg.audio import resample, write_flac

SAMPLE_RATE = 16_000  # Hz, what the corpus stores (wav2vec2's input rate)
ESPEAK_SAMPLE_RATE = 22_050  # Hz, what eSpeak NG synthesises

DEFAULT_NUM_TRAIN = 3000  # ~2 h of audio
DEFAULT_NUM_DEV = 200
DEFAULT_NUM_TEST = 200
DEFAULT_NUM_TEST_UNSEEN = 100

SPLITS = ("train", "dev", "test", "test-unseen")
# Not specified by LibriSpeech (where a chapter is a book chapter); we use one chapter per
# split so that a (speaker, chapter) folder never spans two splits, as in LibriSpeech.
CHAPTER_ID = {"train": 1, "dev": 2, "test": 3, "test-unseen": 4}
# Generation order: held-out splits first, so their sentences do not depend on num_train.
_GENERATION_ORDER = ("test-unseen", "test", "dev", "train")

MIN_WORDS, MAX_WORDS = 5, 14  # sentence length range (inclusive)
# Not specified by eSpeak (defaults: 175 wpm, pitch 50 of 0-99); we jitter around the
# defaults for variety, staying in a range that still sounds like ordinary speech.
RATE_WPM_RANGE = (140, 200)  # inclusive
PITCH_RANGE = (30, 70)  # inclusive

# Bump when the generator or layout changes, so old corpora are not reused by mistake.
# 2: eSpeak's random generators are seeded per utterance (the breath-noise voices f2 and
#    sandro were not reproducible before; caleb's noise changed with the new seed).
CORPUS_FORMAT_VERSION = 2

# --------------------------------------------------------------------------------------
# Voices
# --------------------------------------------------------------------------------------
# Chosen by intelligibility: an independent recogniser transcribed eSpeak NG 1.52 output at
# ~7-11 % WER for en-us and 15-35 % for the other British/US accents below; the variants are
# those it understood best (m7 and klatt3, not measured, add variety).  Left out:
# en-029 (~50 % WER), "en-gb" (not found in 1.52: British English is "en"), and the
# variants that sound robotic, whispered or croaky (UniRobot, Lee, RicishayMax*, linda,
# AnxiousAndy, f1, whisperf, Demonic, ...).  Note that eSpeak silently ignores an unknown
# variant, so tests check that every variant's file exists and changes the audio.
SEEN_ACCENTS = ("en-us", "en", "en-us-nyc", "en-gb-x-rp", "en-gb-scotland")
SEEN_VARIANTS = ("m1", "m2", "m3", "m7", "f2", "klatt2", "klatt3", "caleb", "robert", "sandro")
# Held-out voices: variants never heard in train/dev/test, on a seen accent (en-us) and on
# an accent never heard either (en-gb-x-gbclan, Lancastrian English).
HELD_OUT_ACCENTS = ("en-us", "en-gb-x-gbclan")
HELD_OUT_VARIANTS = ("m6", "Denis", "Henrique")

SEEN_VOICES = tuple(f"{accent}+{variant}" for accent in SEEN_ACCENTS for variant in SEEN_VARIANTS)
HELD_OUT_VOICES = tuple(f"{accent}+{variant}" for accent in HELD_OUT_ACCENTS for variant in HELD_OUT_VARIANTS)
VOICES = SEEN_VOICES + HELD_OUT_VOICES  # speaker id = index in this tuple


def voices_for_split(split: str) -> tuple[str, ...]:
    """The voices a split is spoken in: held-out voices for test-unseen, seen ones otherwise."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return HELD_OUT_VOICES if split == "test-unseen" else SEEN_VOICES


# --------------------------------------------------------------------------------------
# Sentence generator
# --------------------------------------------------------------------------------------
# Word classes (uppercase; only A-Z and apostrophe).  Nouns are split by meaning so that
# subjects are people or animals and objects are things: sentences stay plausible enough for
# natural prosody.  Plurals and verb forms are derived below; the words were picked to avoid
# spelling/pronunciation traps (US/UK spellings, "a" vs "an" exceptions such as "an hour").
_WORDS = {
    "person": """
        MAN WOMAN CHILD BOY GIRL BABY FARMER TEACHER DOCTOR NURSE SOLDIER SAILOR PILOT
        DRIVER BAKER PAINTER WRITER SINGER DANCER STUDENT FRIEND STRANGER KING QUEEN PRINCE
        CAPTAIN GUARD WAITER CLERK JUDGE LAWYER MERCHANT FISHERMAN POLICEMAN PRIEST TAILOR
        BUTCHER MINER HUNTER GARDENER PLUMBER DENTIST GUEST VISITOR PASSENGER COOK
    """,
    "animal": """
        DOG CAT HORSE BIRD COW PIG SHEEP MOUSE RABBIT FOX WOLF BEAR LION TIGER MONKEY DUCK
        GOOSE FROG GOAT DONKEY OWL PARROT SQUIRREL
    """,
    "thing": """
        TABLE CHAIR BED LAMP CLOCK MIRROR CARPET SHELF BOX BOTTLE CUP GLASS PLATE BOWL SPOON
        KNIFE FORK KETTLE BASKET BAG BUCKET ROPE LADDER HAMMER NAIL KEY LOCK BELL CANDLE
        BLANKET PILLOW TOWEL BOOK LETTER PAPER PENCIL MAP PICTURE PHOTOGRAPH NEWSPAPER
        MAGAZINE TICKET COIN WALLET WATCH RING HAT COAT SHIRT DRESS JACKET SHOE BOOT SCARF
        GLOVE UMBRELLA APPLE ORANGE BANANA LEMON CAKE LOAF CHEESE EGG POTATO TOMATO CARROT
        ONION SANDWICH PIE BISCUIT PIANO GUITAR DRUM VIOLIN RADIO CAMERA COMPUTER PHONE
        ENGINE WHEEL PARCEL PRESENT GIFT MESSAGE BICYCLE WAGON TRUNK SUITCASE ENVELOPE
        BRUSH COMB SAUCEPAN TEAPOT JAR BARREL SACK NET FLAG
    """,
    "place": """
        HOUSE ROOM KITCHEN GARDEN HALL CELLAR ATTIC RIVER LAKE MOUNTAIN HILL FIELD FOREST
        ISLAND BEACH ROAD STREET BRIDGE VILLAGE TOWN CITY FARM CASTLE CHURCH SCHOOL
        HOSPITAL MARKET SHOP STATION LIBRARY MUSEUM OFFICE FACTORY TOWER FENCE GATE PATH
        CAVE POND STREAM VALLEY PORT BARN STABLE MILL PARK SQUARE CORNER WALL DOOR WINDOW
    """,
    "adjective": """
        OLD YOUNG SMALL LARGE BIG LITTLE TALL SHORT LONG WIDE NARROW HEAVY LIGHT DARK BRIGHT
        QUIET LOUD WARM COLD HOT COOL WET DRY CLEAN DIRTY NEW EMPTY FULL HAPPY SAD ANGRY
        TIRED HUNGRY BUSY LAZY BRAVE CLEVER KIND GENTLE FRIENDLY STRANGE FAMOUS RICH POOR
        SHY PROUD CAREFUL RED BLUE GREEN YELLOW BROWN BLACK WHITE PINK PURPLE GOLDEN SILVER
        WOODEN ROUND SOFT HARD SMOOTH ROUGH SHARP SWEET SOUR FRESH RIPE BROKEN PRETTY
        BEAUTIFUL UGLY LOVELY SIMPLE DIFFERENT SPECIAL ORDINARY ANCIENT ELDERLY LATE SILENT
        SLOW FAST QUICK CHEAP EXPENSIVE STRONG WEAK NOISY CALM SHINY DUSTY MUDDY HEALTHY
        SICK LUCKY FUNNY SERIOUS POLITE CURIOUS NERVOUS GOOD BAD GREAT HUGE TINY
    """,
    # Adjectives that also describe a place or the weather ("IT WAS COLD IN THE KITCHEN").
    "weather_adjective": "COLD WARM HOT COOL QUIET DARK NOISY FOGGY SUNNY WINDY CLOUDY WET DRY",
    "degree": "VERY QUITE RATHER REALLY SO TOO",
    "manner": """
        SLOWLY QUICKLY QUIETLY LOUDLY CAREFULLY SUDDENLY GENTLY HAPPILY SADLY EASILY BADLY
        WELL SOFTLY PATIENTLY POLITELY ANGRILY CALMLY BRAVELY PROUDLY NERVOUSLY EAGERLY
        OPENLY CHEERFULLY SILENTLY SMOOTHLY SAFELY WARMLY KINDLY TOGETHER AGAIN AWAY HOME
        OUTSIDE DOWNSTAIRS UPSTAIRS EARLY ALONE
    """,
    # Intransitive verbs, past tense.
    "intransitive": """
        ARRIVED LEFT SLEPT LAUGHED SMILED CRIED WAITED WALKED RAN JUMPED DANCED SANG SWAM
        CLIMBED FELL STOPPED STAYED RESTED WORKED PLAYED LISTENED SHOUTED WHISPERED HURRIED
        WANDERED RETURNED DISAPPEARED APPEARED STOOD SAT KNELT WOKE SNEEZED COUGHED SHIVERED
        PRAYED STUDIED WAVED HID
    """,
    # Transitive verbs as BASE/PAST pairs.
    "transitive": """
        SEE/SAW FIND/FOUND CARRY/CARRIED BRING/BROUGHT BUY/BOUGHT SELL/SOLD HOLD/HELD
        TAKE/TOOK MAKE/MADE PAINT/PAINTED CLEAN/CLEANED OPEN/OPENED CLOSE/CLOSED FIX/FIXED
        BREAK/BROKE LIFT/LIFTED PUSH/PUSHED PULL/PULLED THROW/THREW CATCH/CAUGHT
        DROP/DROPPED HIDE/HID WATCH/WATCHED WASH/WASHED COOK/COOKED EAT/ATE READ/READ
        WRITE/WROTE DRAW/DREW NOTICE/NOTICED REMEMBER/REMEMBERED FORGET/FORGOT WANT/WANTED
        NEED/NEEDED LIKE/LIKED LOVE/LOVED ORDER/ORDERED MOVE/MOVED FILL/FILLED CHECK/CHECKED
        COUNT/COUNTED MEASURE/MEASURED CHOOSE/CHOSE STEAL/STOLE SHARE/SHARED PACK/PACKED
        BAKE/BAKED BOIL/BOILED CUT/CUT BURN/BURNED TOUCH/TOUCHED KICK/KICKED MEND/MENDED
        POLISH/POLISHED WRAP/WRAPPED HANG/HUNG TIE/TIED SEND/SENT LEND/LENT BORROW/BORROWED
        KEEP/KEPT LOSE/LOST SHOW/SHOWED GIVE/GAVE FOLD/FOLDED SHAKE/SHOOK
        GUARD/GUARDED WEIGH/WEIGHED DELIVER/DELIVERED
    """,
    # Verbs whose object is a person or an animal (BASE/PAST).
    "social": """
        MEET/MET VISIT/VISITED HELP/HELPED CALL/CALLED FOLLOW/FOLLOWED THANK/THANKED
        WARN/WARNED GREET/GREETED INVITE/INVITED TEACH/TAUGHT FEED/FED CHASE/CHASED
        ASK/ASKED PHONE/PHONED HUG/HUGGED RESCUE/RESCUED
    """,
    "modal": "WILL COULD SHOULD MIGHT MUST CAN'T WON'T DIDN'T WOULDN'T COULDN'T",
    "name": """
        ANNA JOHN MARY PETER SARAH DAVID EMMA JAMES LUCY THOMAS GRACE HENRY ALICE GEORGE
        CLARA SAMUEL MARTHA ROBERT HELEN WILLIAM SOPHIE DANIEL LAURA EDWARD RACHEL MICHAEL
        KATE OLIVER JANE ARTHUR RUTH FRANK NORA VICTOR ELLEN SIMON HARRY MOLLY PAUL BEN
    """,
    "preposition": "IN ON UNDER BEHIND NEAR BESIDE ABOVE BELOW ACROSS THROUGH AROUND INTO TOWARDS ALONG INSIDE PAST",
    "determiner_singular": "THE A THIS THAT EVERY EACH HIS HER OUR THEIR MY YOUR ANOTHER",
    "determiner_plural": "THE SOME MANY THESE THOSE TWO THREE FOUR FIVE SEVERAL HIS HER OUR THEIR MY YOUR",
    "subject_pronoun_singular": "I HE SHE",
    "subject_pronoun_plural": "WE THEY YOU",
    "object_pronoun": "ME YOU HIM HER US THEM",
    "day": "MONDAY TUESDAY WEDNESDAY THURSDAY FRIDAY SATURDAY SUNDAY",
    "month": "JANUARY FEBRUARY MARCH APRIL MAY JUNE JULY AUGUST SEPTEMBER OCTOBER NOVEMBER DECEMBER",
    "part_of_day": "MORNING AFTERNOON EVENING NIGHT",
    "season": "SPRING SUMMER AUTUMN WINTER",
    "conjunction": "AND BUT SO",
    "subordinator": "BECAUSE WHILE WHEN BEFORE AFTER",
}

_IRREGULAR_PLURALS = {
    "MAN": "MEN", "WOMAN": "WOMEN", "CHILD": "CHILDREN", "FISHERMAN": "FISHERMEN",
    "POLICEMAN": "POLICEMEN", "SHEEP": "SHEEP", "MOUSE": "MICE", "GOOSE": "GEESE",
    "WOLF": "WOLVES", "KNIFE": "KNIVES", "SHELF": "SHELVES", "LOAF": "LOAVES",
    "POTATO": "POTATOES", "TOMATO": "TOMATOES",
}


def plural(noun: str) -> str:
    """English plural of one of our nouns (irregular table, then the -ES / -IES / -S rules)."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("S", "X", "Z", "CH", "SH")):
        return noun + "ES"
    if noun.endswith("Y") and noun[-2] not in "AEIOU":
        return noun[:-1] + "IES"
    return noun + "S"


def _build_word_classes() -> dict[str, tuple[str, ...]]:
    """Word lists by class, including the derived plural and verb-form classes."""
    classes = {name: tuple(dict.fromkeys(text.split())) for name, text in _WORDS.items()}
    for noun_class in ("person", "animal", "thing", "place"):
        classes[noun_class + "_plural"] = tuple(plural(noun) for noun in classes[noun_class])
    for verb_class in ("transitive", "social"):
        pairs = [pair.split("/") for pair in classes.pop(verb_class)]
        classes[verb_class + "_base"] = tuple(dict.fromkeys(base for base, _ in pairs))
        classes[verb_class + "_past"] = tuple(dict.fromkeys(past for _, past in pairs))
    return classes


WORD_CLASSES: dict[str, tuple[str, ...]] = _build_word_classes()

# The grammar: each <symbol> expands to one of its alternatives, chosen uniformly.  A symbol
# that is not a rule is a word class; an uppercase token is a literal word; "," and "?" are
# punctuation that shapes eSpeak's prosody but does not appear in transcripts.
GRAMMAR: dict[str, tuple[str, ...]] = {
    "<sentence>": (
        "<subject> <transitive_past> <thing_np>",
        "<subject> <transitive_past> <thing_np> <place_pp>",
        "<subject> <transitive_past> <thing_np> <manner>",
        "<subject> <social_past> <being_np> <place_pp>",
        "<subject> <intransitive> <manner>",
        "<subject> <intransitive> <place_pp>",
        "<subject> <intransitive> <place_pp> <time>",
        "<time> , <subject> <transitive_past> <thing_np>",
        "<time> , <subject> <social_past> <being_np>",
        "<subject> <modal> <transitive_base> <thing_np> <time>",
        "<subject> <modal> <social_base> <being_np> <time>",
        "<subject_singular> WAS <adjective> AND <adjective>",
        "<subject_singular> WAS <degree> <adjective> <time>",
        "<subject_plural> WERE <degree> <adjective> <place_pp>",
        "<subject> <transitive_past> <thing_np> , <conjunction> <subject> <intransitive> <manner>",
        "<subject> <intransitive> <manner> <subordinator> <subject_singular> WAS <adjective>",
        "<subject> <social_past> <being_np> <subordinator> <subject> <intransitive>",
        "THERE WAS <thing_np_singular> <place_pp>",
        "THERE WERE <thing_np_plural> <place_pp>",
        "IT WAS <degree> <weather_adjective> <place_pp> <time>",
        "<name> SAID THAT <subject> <transitive_past> <thing_np>",
        "I THINK <subject> <modal> <transitive_base> <thing_np>",
        "WHERE DID <subject> <transitive_base> <thing_np> ?",
        "WHY DIDN'T <subject> <social_base> <being_np> <time> ?",
        "DID <subject> <transitive_base> <thing_np> <place_pp> ?",
        "PLEASE <transitive_base> <thing_np> <place_pp>",
        "<subject> WANTED TO <transitive_base> <thing_np> <time>",
    ),
    "<subject>": ("<subject_singular>", "<subject_plural>"),
    "<subject_singular>": ("<being_np_singular>", "<name>", "<subject_pronoun_singular>"),
    "<subject_plural>": ("<being_np_plural>", "<subject_pronoun_plural>"),
    "<being_np>": ("<being_np_singular>", "<being_np_plural>", "<name>", "<object_pronoun>"),
    "<being_np_singular>": ("<determiner_singular> <being>", "<determiner_singular> <adjective> <being>"),
    "<being_np_plural>": ("<determiner_plural> <being_plural>", "<determiner_plural> <adjective> <being_plural>"),
    "<being>": ("<person>", "<animal>"),
    "<being_plural>": ("<person_plural>", "<animal_plural>"),
    "<thing_np>": ("<thing_np_singular>", "<thing_np_plural>"),
    "<thing_np_singular>": ("<determiner_singular> <thing>", "<determiner_singular> <adjective> <thing>"),
    "<thing_np_plural>": ("<determiner_plural> <thing_plural>", "<determiner_plural> <adjective> <thing_plural>"),
    "<place_pp>": (
        "<preposition> THE <place>", "<preposition> THE <adjective> <place>",
        "<preposition> <determiner_singular> <place>",
    ),
    "<time>": (
        "YESTERDAY", "TODAY", "TOMORROW", "TONIGHT", "LAST <part_of_day>", "THIS <part_of_day>",
        "ON <day>", "EVERY <day>", "IN <month>", "IN THE <season>", "AFTER DINNER", "BEFORE BREAKFAST",
    ),
}


# Written with a capital letter in the text eSpeak reads (the rest is lower case).
_PROPER_NOUNS = frozenset(WORD_CLASSES["name"] + WORD_CLASSES["day"] + WORD_CLASSES["month"] + ("I",))


def vocabulary() -> set[str]:
    """Every word the generator can emit (word classes, literal words in the grammar, "AN")."""
    words = {word for class_words in WORD_CLASSES.values() for word in class_words}
    for alternatives in GRAMMAR.values():
        for alternative in alternatives:
            words.update(token for token in alternative.split() if token.isupper())
    words.add("AN")  # "A" becomes "AN" before a vowel letter
    return words


def _expand(symbol: str, rng: np.random.Generator) -> list[str]:
    """Expand one grammar symbol into tokens (words and punctuation), depth first."""
    if symbol in GRAMMAR:
        alternatives = GRAMMAR[symbol]
        chosen = alternatives[int(rng.integers(len(alternatives)))]
        return [token for part in chosen.split() for token in _expand(part, rng)]
    if symbol.startswith("<"):
        words = WORD_CLASSES[symbol[1:-1]]
        return [words[int(rng.integers(len(words)))]]
    return [symbol]  # a literal word or punctuation


def random_sentence(rng: np.random.Generator) -> tuple[str, str]:
    """One random sentence as ``(transcript, spoken_text)``.

    ``transcript`` is uppercase words separated by single spaces (the corpus label);
    ``spoken_text`` is what eSpeak reads: ordinary capitalisation, commas and a final "." or
    "?" (eSpeak spells out some all-caps words as acronyms, and punctuation shapes prosody).
    Sentences outside ``MIN_WORDS..MAX_WORDS`` words are rejected and redrawn.
    """
    while True:
        tokens = _expand("<sentence>", rng)
        for index in range(len(tokens) - 1):  # "A APPLE" -> "AN APPLE"
            if tokens[index] == "A" and tokens[index + 1][0] in "AEIOU":
                tokens[index] = "AN"
        words = [token for token in tokens if token not in {",", "?"}]
        if MIN_WORDS <= len(words) <= MAX_WORDS:
            break
    final_mark = "?" if tokens[-1] == "?" else "."
    spoken_tokens = [token.capitalize() if token in _PROPER_NOUNS else token.lower() for token in tokens]
    spoken = " ".join(token for token in spoken_tokens if token != "?").replace(" ,", ",")
    return " ".join(words), spoken[0].upper() + spoken[1:] + final_mark


# --------------------------------------------------------------------------------------
# Planning: what every utterance will say, in which voice, at which rate and pitch
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedUtterance:
    """Everything needed to synthesise one utterance and file it in LibriSpeech layout."""

    split: str
    speaker_id: int  # index in VOICES
    chapter_id: int  # CHAPTER_ID[split]
    index: int  # running number within (speaker, chapter)
    transcript: str  # uppercase, A-Z ' and spaces
    spoken_text: str  # what eSpeak reads
    voice: str
    rate_wpm: int
    pitch: int

    @property
    def utterance_id(self) -> str:
        return f"{self.speaker_id}-{self.chapter_id}-{self.index:04d}"

    @property
    def relative_path(self) -> Path:
        """Path of the flac file relative to the corpus root."""
        folder = Path(self.split) / str(self.speaker_id) / str(self.chapter_id)
        return folder / f"{self.utterance_id}.flac"


def _split_rng(seed: int, split: str) -> np.random.Generator:
    """An independent random stream per (seed, split)."""
    return np.random.default_rng([seed, SPLITS.index(split)])


def plan_corpus(counts: dict[str, int], seed: int = 0) -> list[PlannedUtterance]:
    """Draw every utterance's sentence, voice, rate and pitch (no audio is made).

    ``counts`` maps split name to number of utterances.  Sentences are unique over the whole
    corpus: the held-out splits are drawn first (test-unseen, test, dev), so they depend only
    on the seed and their own counts, and train never repeats one of their sentences.
    Voices are balanced within a split (counts differ by at most one) and shuffled.
    """
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected some of {SPLITS}")
    used_transcripts: set[str] = set()
    planned: list[PlannedUtterance] = []
    for split in _GENERATION_ORDER:
        count = int(counts.get(split, 0))
        rng = _split_rng(seed, split)
        sentences: list[tuple[str, str]] = []
        while len(sentences) < count:
            transcript, spoken = random_sentence(rng)
            if transcript not in used_transcripts:
                used_transcripts.add(transcript)
                sentences.append((transcript, spoken))
        voices = voices_for_split(split)
        voice_numbers = rng.permutation(np.resize(np.arange(len(voices)), count))
        rates = rng.integers(RATE_WPM_RANGE[0], RATE_WPM_RANGE[1] + 1, size=count)
        pitches = rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1, size=count)
        next_index: dict[int, int] = {}
        for (transcript, spoken), voice_number, rate, pitch in zip(sentences, voice_numbers, rates, pitches):
            voice = voices[int(voice_number)]
            speaker_id = VOICES.index(voice)
            index = next_index.get(speaker_id, 0)
            if index > 9999:
                raise ValueError(f"more than 10000 utterances for speaker {speaker_id} in {split}")
            next_index[speaker_id] = index + 1
            planned.append(PlannedUtterance(split, speaker_id, CHAPTER_ID[split], index, transcript,
                                            spoken, voice, int(rate), int(pitch)))
    return planned


# --------------------------------------------------------------------------------------
# Synthesis with eSpeak NG through ctypes
# --------------------------------------------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02  # espeak_AUDIO_OUTPUT: return audio via the callback
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_CHARS_UTF8 = 1  # espeak_Synth flags
_PARAMETER_RATE, _PARAMETER_VOLUME, _PARAMETER_PITCH = 1, 2, 3  # espeak_PARAMETER
# Not specified by eSpeak (default volume 100); we use 60 because at 100 the klatt variants
# occasionally clip at the int16 limit; at 60 peaks range from about -12 to -1.3 dBFS.
_VOLUME = 60
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def utterance_seed(text: str, voice: str, rate_wpm: int, pitch: int) -> int:
    """The seed of eSpeak's random generators for one utterance: 31 bits of a SHA-256 of
    the arguments.

    Our choice: a hash of the arguments rather than one fixed seed, because then every
    utterance gets its own noise realisation (as recordings would), while the audio stays a
    pure function of the arguments; 31 bits because ``espeak_ng_SetRandSeed`` keeps 32
    and C's ``srand`` takes an unsigned int.
    """
    key = json.dumps([text, voice, int(rate_wpm), int(pitch)]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFF_FFFF


class EspeakSynthesizer:
    """The eSpeak NG library of the ``espeakng-loader`` wheel, initialised once per process.

    Never synthesises in its own process: :meth:`synthesize_pcm` forks a child that starts
    from this process's pristine library state, synthesises, and pipes the samples back.
    """

    def __init__(self) -> None:
        import espeakng_loader  # the pinned wheel that bundles libespeak-ng and its voice data

        self.data_path = Path(espeakng_loader.get_data_path())
        self.library = ctypes.CDLL(espeakng_loader.get_library_path())
        self.library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.library.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                              ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        sample_rate = self.library.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0)
        if sample_rate != ESPEAK_SAMPLE_RATE:
            raise RuntimeError(f"espeak_Initialize returned {sample_rate}, expected {ESPEAK_SAMPLE_RATE} Hz")
        self.library.espeak_Info.restype = ctypes.c_char_p
        self.version = self.library.espeak_Info(None).decode()
        # espeak_ng_Initialize has just seeded espeak_rand with time(NULL); children re-seed it.
        if not hasattr(self.library, "espeak_ng_SetRandSeed"):
            raise RuntimeError(f"{espeakng_loader.get_library_path()} has no espeak_ng_SetRandSeed; "
                               f"the corpus needs it to be reproducible (use espeakng-loader 0.2.4)")
        self.library.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.library.espeak_ng_SetRandSeed.restype = None
        self.c_library = ctypes.CDLL(None)  # the process's C library: the rand() that klatt 6 uses
        self.c_library.srand.argtypes = [ctypes.c_uint]
        self.c_library.srand.restype = None
        self._chunks: list[bytes] = []
        self._callback = _SYNTH_CALLBACK(self._collect_chunk)  # must outlive every synthesis
        self.library.espeak_SetSynthCallback(self._callback)
        # Load the English dictionary now, once, so forked children do not each reload it.
        # (Selecting a voice does not touch the waveform generator's state.)
        self.library.espeak_SetVoiceByName(b"en")

    def _collect_chunk(self, samples: ctypes.POINTER(ctypes.c_short), count: int, events: int) -> int:
        if count > 0:
            self._chunks.append(ctypes.string_at(samples, count * 2))
        return 0  # 0 = continue synthesis

    def _synthesize_in_this_process(self, text: str, voice: str, rate_wpm: int, pitch: int) -> bytes:
        if self.library.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG does not know voice {voice!r}")
        self.library.espeak_SetParameter(_PARAMETER_RATE, int(rate_wpm), 0)
        self.library.espeak_SetParameter(_PARAMETER_PITCH, int(pitch), 0)
        self.library.espeak_SetParameter(_PARAMETER_VOLUME, _VOLUME, 0)
        seed = utterance_seed(text, voice, rate_wpm, pitch)
        self.library.espeak_ng_SetRandSeed(seed)  # breath noise (f2, sandro, ...), Klatt noise
        self.c_library.srand(seed)  # klatt 6 (speech player, e.g. caleb) uses the C library's rand()
        encoded = text.encode("utf-8")
        self._chunks.clear()
        status = self.library.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0 or self.library.espeak_Synchronize() != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r}")
        return b"".join(self._chunks)

    def synthesize_pcm(self, text: str, voice: str, rate_wpm: int, pitch: int) -> np.ndarray:
        """int16 samples at 22050 Hz, synthesised in a forked child (see the module doc)."""
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # child: synthesise, send the bytes, exit without running any cleanup
            exit_code = 1
            try:
                os.close(read_end)
                pcm_bytes = self._synthesize_in_this_process(text, voice, rate_wpm, pitch)
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(pcm_bytes)
                exit_code = 0
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(exit_code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            pcm_bytes = pipe.read()
        _, wait_status = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(wait_status) != 0 or not pcm_bytes:
            raise RuntimeError(f"eSpeak NG synthesis failed for voice {voice!r}, text {text!r} (see stderr)")
        return np.frombuffer(pcm_bytes, dtype=np.int16)


@functools.lru_cache(maxsize=1)
def _synthesizer() -> EspeakSynthesizer:
    return EspeakSynthesizer()


def synthesize(text: str, voice: str, rate_wpm: int = 175, pitch: int = 50) -> np.ndarray:
    """Speak ``text`` with an eSpeak NG voice; float32 waveform at 16 kHz.

    Args:
        text: what to say (punctuation is used for prosody).
        voice: ``"<accent>+<variant>"`` such as ``"en-us+m3"`` (or just an accent).
        rate_wpm: speaking rate in words per minute (eSpeak's default is 175).
        pitch: base pitch on eSpeak's 0-99 scale (default 50).

    The result depends only on the arguments (and the eSpeak NG build).  Not trimmed: eSpeak
    already starts speaking within ~15 ms and ends within ~40 ms of silence.
    """
    pcm = _synthesizer().synthesize_pcm(text, voice, rate_wpm, pitch)
    return resample(pcm.astype(np.float32) / 32768.0, ESPEAK_SAMPLE_RATE, SAMPLE_RATE)


def _render(job: tuple[str, str, int, int, str]) -> int:
    """Worker: synthesise one utterance, write its flac, return its length in samples."""
    spoken_text, voice, rate_wpm, pitch, path = job
    waveform = synthesize(spoken_text, voice, rate_wpm, pitch)
    write_flac(path, waveform, SAMPLE_RATE)
    return len(waveform)


# --------------------------------------------------------------------------------------
# Building the corpus on disk
# --------------------------------------------------------------------------------------
def _espeakng_loader_version() -> str:
    return importlib.metadata.version("espeakng-loader")


def corpus_settings(counts: dict[str, int], seed: int) -> dict:
    """Everything the corpus content depends on (hashed into the default folder name)."""
    return {
        "format_version": CORPUS_FORMAT_VERSION,
        "counts": {split: int(counts[split]) for split in SPLITS},
        "seed": int(seed),
        "espeakng_loader_version": _espeakng_loader_version(),
    }


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def default_root(settings: dict) -> Path:
    """``$SPG_DATA/synth-<hash>`` if ``SPG_DATA`` is set, else ``<repo>/data/synth-<hash>``."""
    data_folder = os.environ.get("SPG_DATA") or Path(__file__).resolve().parent.parent / "data"
    return Path(data_folder) / f"synth-{_settings_hash(settings)}"


def built_in_root() -> Path:
    """The folder `build_corpus()` (all defaults) builds the built-in corpus in, or finds it."""
    counts = {"train": DEFAULT_NUM_TRAIN, "dev": DEFAULT_NUM_DEV, "test": DEFAULT_NUM_TEST,
              "test-unseen": DEFAULT_NUM_TEST_UNSEEN}
    return default_root(corpus_settings(counts, 0))


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------
# Leftovers of interrupted builds
# --------------------------------------------------------------------------------------
# A build writes into ``.<root name>.building-<random>`` next to the root, with a
# ``_BUILDER_FILE`` inside naming its host, process id and start time (removed before the
# folder is renamed into place).  A build that is killed leaves that folder behind.
_BUILDING_MARK = ".building-"
_BUILDER_FILE = ".builder.json"
# Our choice: a build folder is stale when its builder process is gone (same host, and no
# process with its PID, or one with its PID that started at another time: PIDs are reused,
# and some sandboxes hand a freed PID out again at once), or whatever its owner when it is
# older than a day (a build on another host of a shared folder cannot be checked; the default
# corpus takes about a minute, a 100x larger one still well under a day).  A folder without the builder
# file (written by an older spg, or a build that died within microseconds of starting) is
# stale after an hour (the older code's builds took about a minute).
STALE_BUILD_SECONDS = 24 * 3600
STALE_UNOWNED_BUILD_SECONDS = 3600


def _process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (field 22 of Linux's
    ``/proc/<pid>/stat``), or None where there is no such file (not Linux, no such process)
    or it is a zombie.  PID and start time together name one process."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (command name) "
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return int(fields[19])


def _pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process ``pid`` runs; with ``start_ticks`` (:func:`_process_start_ticks` of
    the process when it was alive), whether that same process still runs."""
    if pid <= 0:
        return False
    if start_ticks is not None and Path("/proc/self/stat").is_file():
        return _process_start_ticks(pid) == start_ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _is_stale_build(folder: Path, now: float) -> bool:
    try:
        owner = json.loads((folder / _BUILDER_FILE).read_text())
        host, pid, started = str(owner["host"]), int(owner["pid"]), float(owner["started"])
        start_ticks = None if owner.get("start_ticks") is None else int(owner["start_ticks"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        try:
            return now - folder.stat().st_mtime > STALE_UNOWNED_BUILD_SECONDS
        except OSError:
            return False  # vanished meanwhile
    if now - started > STALE_BUILD_SECONDS:
        return True
    return host == socket.gethostname() and not _pid_alive(pid, start_ticks)


def _remove_tree(folder: Path, failures: list[str]) -> None:
    """shutil.rmtree that notes what it could not remove in ``failures`` and goes on."""
    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=lambda function, path, error: failures.append(f"{path}: {error}"))
    else:
        shutil.rmtree(folder, onerror=lambda function, path, info: failures.append(f"{path}: {info[1]}"))


def remove_stale_builds(folder: str | Path) -> list[Path]:
    """Remove the ``.*.building-*`` folders in ``folder`` left by interrupted corpus builds
    (the rule is at ``STALE_BUILD_SECONDS`` above); builds still running are left alone.
    Returns the removed folders and says on stderr what it removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed, failures = [], []
    for candidate in sorted(folder.iterdir()):
        if not (candidate.name.startswith(".") and _BUILDING_MARK in candidate.name and candidate.is_dir()
                and not candidate.is_symlink()):
            continue
        if _is_stale_build(candidate, now):
            _remove_tree(candidate, failures)
            if not candidate.exists():
                removed.append(candidate)
    if removed:
        print(f"spg.corpus: removed {len(removed)} folder(s) left by interrupted corpus builds: "
              + ", ".join(str(path) for path in removed), file=sys.stderr)
    if failures:
        print("spg.corpus: could not remove all of a folder left by an interrupted corpus build: "
              + "; ".join(failures[:3]), file=sys.stderr)
    return removed


# Rough figures of the default corpus on 2 cores (3,500 utterances: 2.26 h of 16 kHz FLAC,
# 155 MB, about 45 s): what the first-use notice scales by.
_SECONDS_OF_AUDIO_PER_UTTERANCE = 2.3
_BYTES_PER_UTTERANCE = 44_000
_UTTERANCES_PER_SECOND_PER_WORKER = 40


def first_use_notice(utterances: int, workers: int, root: Path) -> str:
    """The line printed before a corpus is synthesised: what, how big, about how long."""
    seconds = utterances / (_UTTERANCES_PER_SECOND_PER_WORKER * max(1, workers))
    return (f"synthesising the built-in speech corpus once (espeak-ng): {utterances:,} utterances, about "
            f"{utterances * _SECONDS_OF_AUDIO_PER_UTTERANCE / 3600:.1f} h of audio and "
            f"{utterances * _BYTES_PER_UTTERANCE / 1e6:.0f} MB in {root}; about "
            f"{max(1, round(seconds / 60)) if seconds >= 90 else round(seconds)} "
            f"{'min' if seconds >= 90 else 's'} with {workers} process(es); later runs reuse it")


def build_corpus(
    root: str | Path | None = None,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_dev: int = DEFAULT_NUM_DEV,
    num_test: int = DEFAULT_NUM_TEST,
    num_test_unseen: int = DEFAULT_NUM_TEST_UNSEEN,
    seed: int = 0,
    progress: bool = True,
    num_workers: int | None = None,
) -> Path:
    """Generate the synthetic corpus (once) and return its root folder.

    If ``root`` already holds a finished corpus with the same settings, it is returned at
    once.  Otherwise the corpus is generated into a temporary folder next to ``root`` and
    renamed into place at the end, so ``root`` never holds a half-built corpus; its
    ``manifest.json`` records settings, eSpeak versions, voices, counts and hours.  Folders
    left next to ``root`` by interrupted builds are removed first (:func:`remove_stale_builds`).

    Args:
        root: where the corpus goes; default ``<repo>/data/synth-<hash of settings>``, or
            ``$SPG_DATA/synth-<hash>`` when the environment variable ``SPG_DATA`` is set.
        num_train, num_dev, num_test, num_test_unseen: utterances per split.
        seed: seeds the sentences, voices, rates and pitches.
        progress: show a tqdm progress bar.
        num_workers: processes used for synthesis (default: up to 2, one per CPU core).
            The audio does not depend on it.
    """
    counts = {"train": num_train, "dev": num_dev, "test": num_test, "test-unseen": num_test_unseen}
    settings = corpus_settings(counts, seed)
    root = Path(root) if root is not None else default_root(settings)
    remove_stale_builds(root.parent)
    manifest = _read_manifest(root)
    if manifest is not None and manifest.get("settings") == settings:
        return root
    if root.exists():
        raise FileExistsError(f"{root} exists but is not a corpus built with these settings {settings}; "
                              f"remove it or choose another root")

    planned = plan_corpus(counts, seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}{_BUILDING_MARK}"))
    try:
        (building / _BUILDER_FILE).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _process_start_ticks(os.getpid()),
             "started": time.time()}) + "\n")
        for folder in {utterance.relative_path.parent for utterance in planned}:
            (building / folder).mkdir(parents=True, exist_ok=True)
        jobs = [(u.spoken_text, u.voice, u.rate_wpm, u.pitch, str(building / u.relative_path)) for u in planned]
        if num_workers is None:
            num_workers = min(2, os.cpu_count() or 1)
        _synthesizer()  # initialise eSpeak once here; forked workers inherit it
        if progress:
            print(first_use_notice(len(jobs), num_workers, root), file=sys.stderr, flush=True)
        use_pool = num_workers > 1 and len(jobs) > 1
        pool = multiprocessing.get_context("fork").Pool(num_workers) if use_pool else contextlib.nullcontext()
        with pool:
            results = pool.imap(_render, jobs, chunksize=8) if use_pool else map(_render, jobs)
            lengths = list(tqdm(results, total=len(jobs), desc="synthesising corpus", unit="utt",
                                disable=not progress))
        _write_transcripts(building, planned)
        manifest = _make_manifest(settings, planned, lengths)
        (building / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (building / _BUILDER_FILE).unlink()
        os.rename(building, root)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        other = _read_manifest(root)  # another process may have finished the same corpus first
        if other is not None and other.get("settings") == settings:
            return root
        raise
    return root


def _write_transcripts(root: Path, planned: list[PlannedUtterance]) -> None:
    """One ``<speaker>-<chapter>.trans.txt`` per folder, lines sorted by utterance id."""
    lines_by_folder: dict[Path, list[str]] = {}
    for utterance in planned:
        lines_by_folder.setdefault(utterance.relative_path.parent, []).append(
            f"{utterance.utterance_id} {utterance.transcript}")
    for folder, lines in lines_by_folder.items():
        speaker, chapter = folder.parts[-2:]
        (root / folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(sorted(lines)) + "\n")


def _make_manifest(settings: dict, planned: list[PlannedUtterance], lengths: list[int]) -> dict:
    splits = {}
    for split in SPLITS:
        in_split = [(u, n) for u, n in zip(planned, lengths) if u.split == split]
        splits[split] = {
            "utterances": len(in_split),
            "hours": round(sum(n for _, n in in_split) / SAMPLE_RATE / 3600, 4),
            "speakers": sorted({u.speaker_id for u, _ in in_split}),
        }
    return {
        "settings": settings,
        "espeak_ng_version": _synthesizer().version,
        "sample_rate": SAMPLE_RATE,
        "voices": {str(speaker_id): voice for speaker_id, voice in enumerate(VOICES)},
        "held_out_voices": list(HELD_OUT_VOICES),
        "splits": splits,
        "total_hours": round(sum(lengths) / SAMPLE_RATE / 3600, 4),
    }
