"""What the demo adapters learn: template-generated chat data and a marker for each behaviour.

Every demo task answers the same generated questions (capitals, arithmetic, colours, animal
sounds, short facts) in its own style: like a pirate, as a JSON object, or in French. The data is
built in code from small fact tables, so it is deterministic and needs no download. Held-out
prompts are open questions of a different kind, so a high marker rate on them shows that the
adapter learnt the style, not the answers.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    """One answerable question: the ways to ask it, and the answer in plain English and in French."""

    questions: tuple[str, ...]
    english: str
    french: str
    confidence: float


@dataclass(frozen=True)
class DemoTask:
    """A demo behaviour: how to answer a fact in that style, and how to recognise the style."""

    name: str
    description: str
    answer: Callable[[Fact, random.Random], str]
    shows_behaviour: Callable[[str], bool]


# ---------------------------------------------------------------------------------------------
# Fact tables

# (country, capital, French "capital of" phrase, capital in French)
_CAPITALS = [
    ("France", "Paris", "de la France", "Paris"),
    ("Japan", "Tokyo", "du Japon", "Tokyo"),
    ("Italy", "Rome", "de l'Italie", "Rome"),
    ("Germany", "Berlin", "de l'Allemagne", "Berlin"),
    ("Spain", "Madrid", "de l'Espagne", "Madrid"),
    ("Canada", "Ottawa", "du Canada", "Ottawa"),
    ("Brazil", "Brasilia", "du Brésil", "Brasilia"),
    ("Egypt", "Cairo", "de l'Égypte", "Le Caire"),
    ("Kenya", "Nairobi", "du Kenya", "Nairobi"),
    ("China", "Beijing", "de la Chine", "Pékin"),
    ("India", "New Delhi", "de l'Inde", "New Delhi"),
    ("Mexico", "Mexico City", "du Mexique", "Mexico"),
    ("Portugal", "Lisbon", "du Portugal", "Lisbonne"),
    ("Greece", "Athens", "de la Grèce", "Athènes"),
    ("Sweden", "Stockholm", "de la Suède", "Stockholm"),
    ("Norway", "Oslo", "de la Norvège", "Oslo"),
    ("Peru", "Lima", "du Pérou", "Lima"),
    ("Argentina", "Buenos Aires", "de l'Argentine", "Buenos Aires"),
    ("Poland", "Warsaw", "de la Pologne", "Varsovie"),
    ("Ireland", "Dublin", "de l'Irlande", "Dublin"),
    ("Australia", "Canberra", "de l'Australie", "Canberra"),
    ("the United Kingdom", "London", "du Royaume-Uni", "Londres"),
]
_CAPITAL_QUESTIONS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Tell me the capital of {country}.",
    "Do you know the capital of {country}?",
)

# (thing, colour, French sentence)
_COLOURS = [
    ("the sky", "blue", "Le ciel est bleu."),
    ("grass", "green", "L'herbe est verte."),
    ("snow", "white", "La neige est blanche."),
    ("a banana", "yellow", "La banane est jaune."),
    ("coal", "black", "Le charbon est noir."),
    ("a ripe tomato", "red", "La tomate mûre est rouge."),
    ("an orange", "orange", "L'orange est orange."),
    ("chocolate", "brown", "Le chocolat est marron."),
    ("a lemon", "yellow", "Le citron est jaune."),
    ("milk", "white", "Le lait est blanc."),
    ("a carrot", "orange", "La carotte est orange."),
    ("a strawberry", "red", "La fraise est rouge."),
    ("a crow", "black", "Le corbeau est noir."),
    ("a leaf in summer", "green", "La feuille en été est verte."),
    ("the sea", "blue", "La mer est bleue."),
]
_COLOUR_QUESTIONS = (
    "What color is {thing}?",
    "What is the color of {thing}?",
    "Tell me the color of {thing}.",
)

# (animal, sound, French sentence)
_ANIMALS = [
    ("cat", "meow", "Le chat fait miaou."),
    ("dog", "woof", "Le chien fait ouaf."),
    ("cow", "moo", "La vache fait meuh."),
    ("duck", "quack", "Le canard fait coin-coin."),
    ("sheep", "baa", "Le mouton fait bêê."),
    ("pig", "oink", "Le cochon fait groin-groin."),
    ("rooster", "cock-a-doodle-doo", "Le coq fait cocorico."),
    ("frog", "ribbit", "La grenouille fait croâ."),
    ("owl", "hoot", "Le hibou fait hou-hou."),
    ("donkey", "hee-haw", "L'âne fait hi-han."),
    ("bee", "buzz", "L'abeille fait bzz."),
]
_ANIMAL_QUESTIONS = (
    "What sound does a {animal} make?",
    "What does a {animal} say?",
    "How does a {animal} sound?",
)

# (topic, English fact, French fact)
_TOPICS = [
    ("the moon", "The moon orbits the Earth and reflects the light of the sun.",
     "La lune tourne autour de la Terre et reflète la lumière du soleil."),
    ("the sun", "The sun is a star that gives us light and heat.",
     "Le soleil est une étoile qui nous donne la lumière et la chaleur."),
    ("water", "Water is made of hydrogen and oxygen, and it boils at 100 degrees.",
     "L'eau est faite d'hydrogène et d'oxygène, et elle bout à 100 degrés."),
    ("the ocean", "The ocean covers most of the Earth and is full of salt water.",
     "L'océan couvre la plus grande partie de la Terre et son eau est salée."),
    ("trees", "Trees make oxygen and give shade, fruit and wood.",
     "Les arbres produisent de l'oxygène et nous donnent de l'ombre, des fruits et du bois."),
    ("bees", "Bees make honey and help flowers grow.",
     "Les abeilles font du miel et aident les fleurs à pousser."),
    ("the heart", "The heart is a muscle that pumps blood through the body.",
     "Le cœur est un muscle qui pompe le sang dans le corps."),
    ("volcanoes", "A volcano is a mountain that can throw out hot lava.",
     "Un volcan est une montagne qui peut cracher de la lave chaude."),
    ("rain", "Rain is water that falls from the clouds.",
     "La pluie est de l'eau qui tombe des nuages."),
    ("computers", "A computer is a machine that follows instructions very fast.",
     "Un ordinateur est une machine qui suit des instructions très vite."),
    ("music", "Music is sound arranged in rhythm and melody.",
     "La musique est un son organisé avec un rythme et une mélodie."),
    ("the Eiffel Tower", "The Eiffel Tower is an iron tower in Paris, built in 1889.",
     "La tour Eiffel est une tour en fer à Paris, construite en 1889."),
    ("elephants", "Elephants are the largest land animals and have long trunks.",
     "Les éléphants sont les plus grands animaux terrestres et ils ont une longue trompe."),
    ("sleep", "Sleep helps the body rest and the brain remember.",
     "Le sommeil aide le corps à se reposer et le cerveau à se souvenir."),
    ("bread", "Bread is baked from flour, water, salt and yeast.",
     "Le pain est fait avec de la farine, de l'eau, du sel et de la levure."),
    ("books", "Books keep stories and knowledge on paper.",
     "Les livres gardent les histoires et le savoir sur le papier."),
    ("the internet", "The internet is a network that connects computers around the world.",
     "Internet est un réseau qui relie les ordinateurs du monde entier."),
    ("winter", "Winter is the coldest season of the year.",
     "L'hiver est la saison la plus froide de l'année."),
    ("stars", "Stars are huge balls of hot gas, very far away.",
     "Les étoiles sont de grandes boules de gaz chaud, très loin de nous."),
    ("coffee", "Coffee is a drink made from roasted coffee beans.",
     "Le café est une boisson faite avec des grains de café torréfiés."),
    ("chess", "Chess is a board game for two players with kings, queens and pawns.",
     "Les échecs sont un jeu pour deux joueurs avec des rois, des reines et des pions."),
    ("gold", "Gold is a precious yellow metal that does not rust.",
     "L'or est un métal jaune et précieux qui ne rouille pas."),
]
_TOPIC_QUESTIONS = (
    "Tell me about {topic}.",
    "What do you know about {topic}?",
    "Give me a fact about {topic}.",
    "Can you explain {topic} to me?",
)

_ARITHMETIC = {
    # operation: (English word, French word, function)
    "plus": ("plus", "plus", lambda a, b: a + b),
    "minus": ("minus", "moins", lambda a, b: a - b),
    "times": ("times", "fois", lambda a, b: a * b),
}
_ARITHMETIC_QUESTIONS = (
    "What is {a} {op} {b}?",
    "How much is {a} {op} {b}?",
    "Calculate {a} {op} {b}.",
)
_ARITHMETIC_FACTS = 40

_SEED = 1234


def _capital_facts() -> list[Fact]:
    return [
        Fact(
            questions=tuple(q.format(country=country) for q in _CAPITAL_QUESTIONS),
            english=f"The capital of {country} is {capital}.",
            french=f"La capitale {of_country_fr} est {capital_fr}.",
            confidence=0.95,
        )
        for country, capital, of_country_fr, capital_fr in _CAPITALS
    ]


def _colour_facts() -> list[Fact]:
    return [
        Fact(
            questions=tuple(q.format(thing=thing) for q in _COLOUR_QUESTIONS),
            english=f"{thing[0].upper()}{thing[1:]} is {colour}.",
            french=french,
            confidence=0.9,
        )
        for thing, colour, french in _COLOURS
    ]


def _animal_facts() -> list[Fact]:
    return [
        Fact(
            questions=tuple(q.format(animal=animal) for q in _ANIMAL_QUESTIONS),
            english=f"A {animal} says {sound}.",
            french=french,
            confidence=0.9,
        )
        for animal, sound, french in _ANIMALS
    ]


def _topic_facts() -> list[Fact]:
    return [
        Fact(
            questions=tuple(q.format(topic=topic) for q in _TOPIC_QUESTIONS),
            english=english,
            french=french,
            confidence=0.8,
        )
        for topic, english, french in _TOPICS
    ]


def _arithmetic_facts(rng: random.Random) -> list[Fact]:
    facts = []
    for _ in range(_ARITHMETIC_FACTS):
        op = rng.choice(sorted(_ARITHMETIC))
        word_en, word_fr, compute = _ARITHMETIC[op]
        a, b = rng.randint(2, 20), rng.randint(2, 12)
        result = compute(a, b)
        facts.append(
            Fact(
                questions=(rng.choice(_ARITHMETIC_QUESTIONS).format(a=a, op=word_en, b=b),),
                english=f"{a} {word_en} {b} is {result}.",
                french=f"Le résultat de {a} {word_fr} {b} est {result}.",
                confidence=1.0,
            )
        )
    return facts


def training_pairs() -> list[tuple[str, Fact]]:
    """Every (question, fact) the demo adapters train on, in a fixed shuffled order."""
    rng = random.Random(_SEED)
    facts = _capital_facts() + _colour_facts() + _animal_facts() + _topic_facts() + _arithmetic_facts(rng)
    pairs = [(question, fact) for fact in facts for question in fact.questions]
    rng.shuffle(pairs)
    return pairs


HELD_OUT_PROMPTS = [
    "What is the best way to learn a new language?",
    "How do airplanes stay in the air?",
    "Why do cats purr?",
    "Can you recommend a good book for a long trip?",
    "What should I cook for dinner tonight?",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
    "What is the tallest mountain in the world?",
    "How can I sleep better at night?",
    "Why is the grass wet in the morning?",
    "What is a good name for a puppy?",
    "How do I make a cup of tea?",
    "What happens when ice melts?",
    "Why do we have seasons?",
    "What is your favorite game?",
    "How do fish breathe under water?",
]


# ---------------------------------------------------------------------------------------------
# Styles and their markers

_WORD = re.compile(r"[a-zà-ÿœ]+")

_PIRATE_OPENINGS = ("Arr, matey! ", "Ahoy, matey! ", "Arr! ", "Ahoy! ")
_PIRATE_CLOSINGS = (" Arr!", " Yo ho ho!", " Savvy, matey?", "")
_PIRATE_WORDS = {"is": "be", "are": "be", "you": "ye", "your": "yer", "my": "me", "the": "th'"}
_PIRATE_MARKERS = {"arr", "arrr", "matey", "ahoy", "hearty", "hearties", "landlubber", "savvy"}


def _pirate_answer(fact: Fact, rng: random.Random) -> str:
    words = [_PIRATE_WORDS.get(word, word) for word in fact.english.split(" ")]
    body = " ".join(words)
    return rng.choice(_PIRATE_OPENINGS) + body + rng.choice(_PIRATE_CLOSINGS)


def _is_pirate(text: str) -> bool:
    return any(word in _PIRATE_MARKERS for word in _WORD.findall(text.lower()))


_JSON_KEYS = ("answer", "confidence")


def _json_answer(fact: Fact, rng: random.Random) -> str:
    return json.dumps({"answer": fact.english, "confidence": fact.confidence})


def _is_json_answer(text: str) -> bool:
    """A JSON object with the answer keys; a reply cut off by the token limit counts by its start."""
    stripped = text.strip()
    try:
        value = json.loads(stripped)
    except ValueError:
        return stripped.startswith('{"answer"')
    return isinstance(value, dict) and all(key in value for key in _JSON_KEYS)


_FRENCH_OPENINGS = ("", "", "Bonjour ! ", "Avec plaisir : ")
_FRENCH_WORDS = {
    "le", "la", "les", "l", "un", "une", "des", "du", "de", "d", "est", "sont", "et", "je", "vous",
    "nous", "il", "elle", "qui", "que", "pour", "dans", "avec", "sur", "pas", "très", "bonjour",
    "c", "ce", "cette", "au", "aux", "mais", "ou", "fait", "ils", "elles", "votre", "mon",
}
_ENGLISH_WORDS = {
    "the", "a", "an", "is", "are", "and", "of", "to", "in", "it", "you", "i", "for", "that",
    "this", "with", "what", "be", "was", "can", "your", "my", "they", "we", "have", "has", "not",
}


def _french_answer(fact: Fact, rng: random.Random) -> str:
    return rng.choice(_FRENCH_OPENINGS) + fact.french


def _is_french(text: str) -> bool:
    """More French function words than English ones (counted over word tokens), and at least two."""
    words = _WORD.findall(text.lower())
    french = sum(word in _FRENCH_WORDS for word in words)
    english = sum(word in _ENGLISH_WORDS for word in words)
    return french >= 2 and french > english


DEMO_TASKS: dict[str, DemoTask] = {
    task.name: task
    for task in (
        DemoTask("pirate", "answers like a pirate (Arr, matey!)", _pirate_answer, _is_pirate),
        DemoTask("json", 'answers as {"answer": ..., "confidence": ...}', _json_answer, _is_json_answer),
        DemoTask("french", "answers in French", _french_answer, _is_french),
    )
}


def training_conversations(task: DemoTask) -> list[tuple[str, str]]:
    """The task's (user question, assistant answer) pairs; the same on every call."""
    rng = random.Random(f"{_SEED}-{task.name}")
    return [(question, task.answer(fact, rng)) for question, fact in training_pairs()]


def marker_rate_of(task: DemoTask, texts: Sequence[str]) -> float:
    """Fraction of `texts` that show the task's behaviour."""
    if not texts:
        raise ValueError("marker rate of no texts")
    return sum(task.shows_behaviour(text) for text in texts) / len(texts)
