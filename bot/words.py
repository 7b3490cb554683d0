"""Model names and subjects: the rules a name and a subject follow, wherever a member types one.

Words a model token must not be: common English, the subject (class) words, and prompt vocabulary.

A DreamBooth token works because the text encoder has (almost) no meaning for it yet: training binds
the member's face to an empty slot. A common word already means something ("max", "king", "rose"),
and that meaning bleeds into every picture and fights the face. A made-up word like "abraza" does not.
Stable Diffusion knows far more words than any list, names above all (thor, zeus, batman, paris), so
the base model's own tokenizer decides too: a name that is one whole token of its vocabulary is taken.
"""

from __future__ import annotations

import discord.utils

from bot.vocabulary import BaseVocabulary, load_vocabulary
from engine.contract.protocol import CLASS_WORD_PATTERN, TOKEN_PATTERN

# Subjects offered by /train; a member may type another 1-3 word subject.
CLASS_WORDS: tuple[str, ...] = (
    "person",
    "man",
    "woman",
    "boy",
    "girl",
    "child",
    "baby",
    "dog",
    "cat",
    "puppy",
    "kitten",
    "horse",
    "bird",
    "rabbit",
    "toy",
    "plush",
    "figurine",
    "car",
    "object",
)

# Roughly the thousand most frequent English words, plus words that mean a lot in image prompts.
_COMMON = """
a able about above accept across act action activity actually add address admit adult affect after again
against age agency agent ago agree agreement ahead air all allow almost alone along already also although
always among amount analysis and animal another answer any anyone anything appear apply approach area
argue arm army around arrive art article artist as ask assume at attack attention attorney audience author
authority available avoid away baby back bad bag ball bank bar base be beat beautiful because become bed
before begin behavior behind believe benefit best better between beyond big bill billion bit black blood
blue board body book born both box boy break bring brother budget build building business but buy by call
camera campaign can cancer candidate capital car card care career carry case catch cause cell center
central century certain certainly chair challenge chance change character charge check child choice choose
church citizen city civil claim class clear clearly close coach cold collection college color come
commercial common community company compare computer concern condition conference congress consider
consumer contain continue control cost could country couple course court cover create crime cultural
culture cup current customer cut dark data daughter day dead deal death debate decade decide decision deep
defense degree democrat democratic describe design despite detail determine develop development die
difference different difficult dinner direction director discover discuss discussion disease do doctor dog
door down draw dream drive drop drug during each early east easy eat economic economy edge education effect
effort eight either election else employee end energy enjoy enough enter entire environment environmental
especially establish even evening event ever every everybody everyone everything evidence exactly example
executive exist expect experience expert explain eye face fact factor fail fall family far fast father
fear federal feel feeling few field fight figure fill film final finally financial find fine finger finish
fire firm first fish five floor fly focus follow food foot for force foreign forget form former forward
four free friend from front full fund future game garden gas general generation get girl give glass go
goal good government great green ground group grow growth guess gun guy hair half hand hang happen happy
hard have he head health hear heart heat heavy help her here herself high him himself his history hit hold
home hope hospital hot hotel hour house how however huge human hundred husband idea identify if image
imagine impact important improve in include including increase indeed indicate individual industry
information inside instead institution interest interesting international interview into investment
involve issue it item its itself job join just keep key kid kill kind kitchen know knowledge land language
large last late later laugh law lawyer lay lead leader learn least leave left leg legal less let letter
level lie life light like likely line list listen little live local long look lose loss lot love low
machine magazine main maintain major majority make man manage management manager many market marriage
material matter may maybe me mean measure media medical meet meeting member memory mention message method
middle might military million mind minute miss mission model modern moment money month more morning most
mother mouth move movement movie much music must my myself name nation national natural nature near nearly
necessary need network never new news newspaper next nice night no none nor north not note nothing notice
now number occur of off offer office officer official often oh oil ok old on once one only onto open
operation opportunity option or order organization other others our out outside over own owner page pain
painting paper parent part participant particular particularly partner party pass past patient pattern
pay peace people per perform performance perhaps period person personal phone physical pick picture piece
place plan plant play player point police policy political politics poor popular population position
positive possible power practice prepare present president pressure pretty prevent price private probably
problem process produce product production professional professor program project property protect prove
provide public pull purpose push put quality question quickly quite race radio raise range rate rather
reach read ready real reality realize really reason receive recent recently recognize record red reduce
reflect region relate relationship religious remain remember remove report represent republican require
research resource respond response responsibility rest result return reveal rich right rise risk road rock
role room rule run safe same save say scene school science scientist score sea season seat second section
security see seek seem sell send senior sense series serious serve service set seven several sex sexual
shake share she shoot short shot should shoulder show side sign significant similar simple simply since
sing single sister sit site situation six size skill skin small smile so social society soldier some
somebody someone something sometimes son song soon sort sound source south southern space speak special
specific speech spend sport spring staff stage stand standard star start state statement station stay
step still stock stop store story strategy street strong structure student study stuff style subject
success successful such suddenly suffer suggest summer support sure surface system table take talk task
tax teach teacher team technology television tell ten tend term test than thank that the their them
themselves then theory there these they thing think third this those though thought thousand threat three
through throughout throw thus time to today together tonight too top total tough toward town trade
traditional training travel treat treatment tree trial trip trouble true truth try turn tv two type under
understand unit until up upon us use usually value various very victim view violence visit voice vote
wait walk wall want war watch water way we weapon wear week weight well west western what whatever when
where whether which while white who whole whom whose why wide wife will win wind window wish with within
without woman wonder word work worker world worry would write writer wrong yard yeah year yes yet you young
your yourself
able above across afraid afternoon alive angry apple april arrow asleep aunt august autumn awake bath
beach bear bell belt bicycle bike bird birthday blanket blind boat bone bottle bowl brain bread breakfast
bridge bright brown brush burn busy butter button cake candle cap captain castle cloud clock coat coffee
coin cook cool corner cow crowd crown cry cute dance danger dear december desk dirty dish doll dress drink
dry duck dust ear earth egg empty engine evil fair false farm fat february feather fence flag flat flower
foggy fork fox friday fruit funny gate gift gold grass gray grey hat heavy hill holiday horse ice iron
island jacket january jelly juice july jump june jungle king kiss knee knife lady lake lamp leaf lemon
lion lip lock march mask meat milk monday monkey moon mountain mouse mud nail neck nest noise nose november
nurse ocean october orange owl pants park pen pencil pig pink pizza plate pocket prince princess purple
queen quiet rabbit rain rainbow river roof rose sad saturday sand scarf shirt shoe silver sister sky sleep
slow smoke snake snow soap sock soft soup spoon square stone storm strawberry sugar sun sunday sweet
swim tail tea teeth thursday tiger tired toe tomato tongue tooth towel toy train tuesday uncle wake warm
wash wednesday wet wheel wing winter wolf wood yellow zebra zero
anime armor art artstation bokeh canvas cartoon castle cinematic closeup comic cyberpunk detailed digital
drawing elf fantasy gothic hdr illustration knight lens lighting lowres ninja oil pastel photo photograph
pirate portrait realistic render robot samurai selfie sketch studio superhero viking watercolor wizard
zombie sks
alex alice anna ben bob charlie chris dan david emma jack james jane john kate leo lily lucy luna mary max
mia mike nick noah olivia paul rose sam sara sarah tom will
"""

COMMON_WORDS: frozenset[str] = frozenset(_COMMON.split()) | frozenset(CLASS_WORDS)

# The base model's vocabulary in this process: none (the lists above only) until one is loaded.
_base_vocabulary = BaseVocabulary()


def load_base_vocabulary(base: str) -> None:
    """Read the tokenizers of `base` ([model] base) once: the bot at start, the CLI before training."""
    global _base_vocabulary
    _base_vocabulary = load_vocabulary(base)


def known_to_base_model(word: str) -> bool:
    """True when the base model's tokenizer has `word` as one whole token (it means something already)."""
    return _base_vocabulary.knows(word)


def normalize_token(name: str) -> str:
    # Phones capitalise the first letter of whatever is typed; "Abraza" means "abraza".
    return name.strip().lower()


def normalize_subject(subject: str) -> str:
    return " ".join(subject.lower().split())


def token_problem(token: str) -> str | None:
    """Why `token` (already normalized) cannot name a model, or None when it can."""
    if not TOKEN_PATTERN.fullmatch(token):
        shown = discord.utils.escape_markdown(token[:40]) or "(empty)"
        return (
            f"`{shown}` can't be a model name: use 3 to 20 lowercase letters or digits, "
            "no spaces or symbols (for example `abraza`)."
        )
    if token.isdigit():
        # A number in a prompt reads as a count ("3 dogs"), never as a name.
        return f"`{token}` is only digits: a model name needs at least one letter (for example `abraza7`)."
    if token in COMMON_WORDS:
        known = "is a common word, so Stable Diffusion already has a meaning for it"
    elif known_to_base_model(token):
        known = "is a word in Stable Diffusion's vocabulary, so it already has a meaning for it"
    else:
        return None
    return (
        f"**{token}** {known}, and that meaning would blend into your face in every picture. The name "
        "works best when the model knows nothing about it yet: pick a made-up word like 'abraza' or 'zorvik'."
    )


def subject_problem(subject: str) -> str | None:
    """Why `subject` (already normalized) cannot be a class word, or None when it can."""
    if CLASS_WORD_PATTERN.fullmatch(subject):
        return None
    return (
        "The subject says what kind of thing you are teaching: 1 to 3 lowercase words, "
        f"like {', '.join(f'`{word}`' for word in CLASS_WORDS[:5])}."
    )
