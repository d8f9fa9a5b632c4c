"""The word lists of the near-opposite check (semantic_check.py): negations, antonym pairs,
number words, and the common words a sentence may start with (not named entities).

The antonym list is hand-written: pairs that flip what a question asks (on / off, enable /
disable, increase / decrease) in the settings, how-to, comparison and yes/no questions that
agents and chat users repeat. Add a pair here and every semantic cache checks it.
"""

from __future__ import annotations

NEGATIONS = frozenset({
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "nowhere", "cannot", "without",
    "isnt", "dont", "doesnt", "cant", "wont", "shouldnt", "wouldnt", "couldnt", "arent", "wasnt", "werent",
})

# Prefixes that negate a word: safe / unsafe, legal / illegal, like / dislike, toxic / nontoxic.
NEGATION_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non", "non-")

ANTONYMS = (
    ("on", "off"), ("enable", "disable"), ("enabled", "disabled"), ("enabling", "disabling"),
    ("activate", "deactivate"), ("start", "stop"), ("open", "close"), ("opened", "closed"), ("show", "hide"),
    ("add", "remove"), ("install", "uninstall"), ("include", "exclude"), ("allow", "deny"), ("allow", "block"),
    ("accept", "reject"), ("encrypt", "decrypt"), ("compress", "decompress"), ("upload", "download"),
    ("import", "export"), ("push", "pull"), ("connect", "disconnect"), ("lock", "unlock"), ("mount", "unmount"),
    ("increase", "decrease"), ("increases", "decreases"), ("raise", "lower"), ("rise", "fall"), ("up", "down"),
    ("more", "less"), ("more", "fewer"), ("most", "least"), ("max", "min"), ("maximum", "minimum"),
    ("maximize", "minimize"), ("higher", "lower"), ("highest", "lowest"), ("high", "low"), ("larger", "smaller"),
    ("largest", "smallest"), ("large", "small"), ("big", "small"), ("bigger", "smaller"), ("biggest", "smallest"),
    ("long", "short"), ("longer", "shorter"), ("longest", "shortest"), ("fast", "slow"), ("faster", "slower"),
    ("fastest", "slowest"), ("hot", "cold"), ("warm", "cool"), ("heavy", "light"), ("heavier", "lighter"),
    ("old", "new"), ("older", "newer"), ("oldest", "newest"), ("old", "young"), ("older", "younger"),
    ("early", "late"), ("earlier", "later"), ("before", "after"), ("first", "last"), ("above", "below"),
    ("over", "under"), ("inside", "outside"), ("in", "out"), ("into", "out"), ("left", "right"), ("north", "south"),
    ("east", "west"), ("top", "bottom"), ("front", "back"), ("forward", "backward"), ("ascending", "descending"),
    ("best", "worst"), ("better", "worse"), ("good", "bad"), ("right", "wrong"), ("correct", "incorrect"),
    ("true", "false"), ("yes", "no"), ("pass", "fail"), ("win", "lose"), ("success", "failure"),
    ("positive", "negative"), ("plus", "minus"), ("add", "subtract"), ("multiply", "divide"), ("sum", "difference"),
    ("buy", "sell"), ("borrow", "lend"), ("give", "take"), ("send", "receive"), ("import", "export"),
    ("safe", "dangerous"), ("safe", "risky"), ("healthy", "harmful"), ("benefits", "risks"), ("pros", "cons"),
    ("advantages", "disadvantages"), ("strengths", "weaknesses"), ("like", "hate"), ("love", "hate"),
    ("agree", "disagree"), ("always", "sometimes"), ("all", "some"), ("every", "some"), ("many", "few"),
    ("increase", "reduce"), ("gain", "lose"), ("cheap", "expensive"), ("cheapest", "expensive"),
    ("cheaper", "costlier"), ("rich", "poor"), ("strong", "weak"), ("stronger", "weaker"), ("easy", "hard"),
    ("easy", "difficult"), ("easier", "harder"), ("simple", "complex"), ("legal", "illegal"), ("valid", "invalid"),
    ("public", "private"), ("internal", "external"), ("input", "output"), ("inbound", "outbound"),
    ("ingress", "egress"), ("read", "write"), ("get", "set"), ("sync", "async"), ("synchronous", "asynchronous"),
    ("client", "server"), ("encode", "decode"), ("serialize", "deserialize"), ("attack", "defend"),
    ("male", "female"), ("men", "women"), ("man", "woman"), ("boy", "girl"), ("day", "night"), ("light", "dark"),
    ("white", "black"), ("summer", "winter"), ("wet", "dry"), ("full", "empty"), ("thick", "thin"),
    ("wide", "narrow"), ("deep", "shallow"), ("near", "far"), ("closer", "farther"), ("import", "export"),
    ("acid", "base"), ("acidic", "basic"), ("cause", "effect"), ("mean", "median"), ("before", "since"),
    ("increase", "lower"), ("join", "leave"), ("arrive", "depart"), ("birth", "death"), ("born", "died"),
    ("asleep", "awake"), ("alive", "dead"), ("present", "absent"), ("permit", "forbid"), ("approve", "deny"),
    ("vertical", "horizontal"), ("above", "beneath"), ("upper", "lower"), ("uppercase", "lowercase"),
    ("online", "offline"), ("visible", "hidden"), ("enter", "exit"), ("login", "logout"), ("sign", "unsign"),
    ("subscribe", "unsubscribe"), ("follow", "unfollow"), ("mute", "unmute"), ("zoom", "unzoom"),
)

# Closed sets whose members exclude one another: "why is the sky blue" is not "... red".
CONTRASTS = (
    ("red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black", "white", "grey",
     "gray"),
    ("second", "seconds", "minute", "minutes", "hour", "hours", "day", "days", "week", "weeks", "month", "months",
     "year", "years", "decade", "decades", "century", "centuries"),
    ("millimeters", "centimeters", "meters", "kilometers", "inches", "feet", "yards", "miles", "mm", "cm", "km"),
    ("grams", "kilograms", "pounds", "ounces", "tons", "kg", "lb", "lbs", "oz"),
    ("celsius", "fahrenheit", "kelvin"), ("liters", "milliliters", "gallons", "cups", "pints", "quarts"),
    ("python", "java", "javascript", "typescript", "rust", "golang", "ruby", "php", "kotlin", "swift", "c++"),
    ("windows", "linux", "macos", "android", "ios", "ubuntu", "debian"),
    ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
     "november", "december"),
    ("mean", "median", "mode", "variance"), ("add", "subtract", "multiply", "divide"),
    ("plus", "minus", "times"), ("sum", "product", "difference", "quotient"),
)

CONTRAST_WORDS = frozenset(w for group in CONTRASTS for w in group)
ANTONYM_OF: dict[str, frozenset[str]] = {}
for _group in CONTRASTS:
    for _x in _group:
        ANTONYM_OF[_x] = ANTONYM_OF.get(_x, frozenset()) | (frozenset(_group) - {_x})
for _x, _y in ANTONYMS:
    ANTONYM_OF[_x] = ANTONYM_OF.get(_x, frozenset()) | {_y}
    ANTONYM_OF[_y] = ANTONYM_OF.get(_y, frozenset()) | {_x}

NUMBER_WORDS = {w: str(i) for i, w in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"))}
NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
                     "ninety": "90", "hundred": "100", "thousand": "1000", "million": "1000000",
                     "billion": "1000000000", "half": "0.5", "twice": "2", "double": "2", "triple": "3",
                     "once": "1", "dozen": "12", "first": "1", "second": "2", "third": "3"})

# Words a question or instruction starts with: capitalised there, but not a name.
COMMON_WORDS = frozenset("""
a an the what whats what's which who whom whose when where why how is are was were am be been do does did
done don't doesn't didn't can can't could would should shall will won't may might must have has had
having tell give show list name explain describe define summarize summarise write compute calculate
find determine solve please i i'm i've i'd we you your my our it its it's this that these those there
their they he she his her him them if in on at by for from of to with without and or but so as not no
yes let lets let's make create help consider suppose assume given using use compare translate convert
rewrite check answer question q hi hello hey ok okay now then also again here just quick briefly
could anyone someone somebody one two three four five six seven eight nine ten each every all any some
after before during while since until because although though however therefore thus first second
third next finally last new old many much more most few less least about into over under between
among through above below up down out off only even still already why's how's where's who's
""".split())
