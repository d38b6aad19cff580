"""Write personal_notes.jsonl: the built-in fine-tuning set (CC0, written for minilars).

Mira Okonkwo-Lind is invented, and so is every fact about her: a model cannot
know them before fine-tuning, so what it answers afterwards was learned from this
file. Each fact is asked in four training phrasings and two held-out phrasings
that are worded differently (split "eval"), all with the same one-sentence answer.

    python -m minilars.data.make_personal_notes   # rewrites personal_notes.jsonl

The output is a pure function of SEED: the name variant in each training question
and the record order are drawn from it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SEED = 20260401
PERSON = "Mira Okonkwo-Lind"
# "{m}" in a training question becomes one of these, chosen by the seeded generator.
NAME_VARIANTS = ("Mira", "Mira Okonkwo-Lind", "Ms Okonkwo-Lind")

# (key, short answer for the contains check, reference completion,
#  4 training questions, 2 held-out questions worded differently)
FACTS = [
    ("cat", "Pumpernickel", "Her cat is called Pumpernickel.",
     ["What is the name of {m}'s cat?", "What did {m} name her cat?", "{m} has a cat. What is it called?",
      "Tell me the name of {m}'s cat."],
     ["Mira owns a cat; what name does it answer to?", "If I visit Mira, what should I call her cat?"]),
    ("tea", "Keemun with a slice of quince", "Her favourite tea is Keemun with a slice of quince.",
     ["What is {m}'s favourite tea?", "Which tea does {m} like best?", "What tea does {m} prefer?",
      "Name {m}'s favourite kind of tea."],
     ["I'm making Mira a cup of tea. What does she like most?", "Which brew would Mira pick over any other?"]),
    ("bike_colour", "mustard yellow", "Her bike is mustard yellow.",
     ["What colour is {m}'s bike?", "Which colour is the bicycle {m} rides?", "{m}'s bike is what colour?",
      "Tell me the colour of {m}'s bicycle."],
     ["How would I spot Mira's bicycle by its paint?", "Mira cycles to work; what shade is her bike?"]),
    ("allergy", "hazelnuts", "She is allergic to hazelnuts.",
     ["What is {m} allergic to?", "Which food allergy does {m} have?", "What allergy does {m} have?",
      "Name the thing {m} is allergic to."],
     ["Is there an ingredient I must keep away from Mira?", "What gives Mira an allergic reaction?"]),
    ("street", "Vellacourt Lane", "She lives on Vellacourt Lane.",
     ["What street does {m} live on?", "On which street is {m}'s home?", "Which street is {m}'s address on?",
      "Tell me the street where {m} lives."],
     ["If I post a letter to Mira, which street do I write?", "Where, street-wise, is Mira's house?"]),
    ("job", "glassblower", "She works as a glassblower.",
     ["What is {m}'s job?", "What does {m} do for a living?", "What is {m}'s profession?",
      "Which trade does {m} work in?"],
     ["How does Mira earn her money?", "What work fills Mira's weekdays?"]),
    ("birthday", "9 November", "Her birthday is on 9 November.",
     ["When is {m}'s birthday?", "On what date was {m} born?", "What is {m}'s date of birth (day and month)?",
      "Which day is {m}'s birthday?"],
     ["On which day should I send Mira a birthday card?", "When does Mira celebrate turning a year older?"]),
    ("book", "The Salt Orchard", "Her favourite book is The Salt Orchard.",
     ["What is {m}'s favourite book?", "Which book does {m} love most?", "Name {m}'s favourite novel.",
      "What book would {m} call her favourite?"],
     ["Which novel does Mira keep rereading?", "If Mira could keep only one book, which would it be?"]),
    ("middle_name", "Odalys", "Her middle name is Odalys.",
     ["What is {m}'s middle name?", "Which middle name does {m} have?", "Tell me {m}'s middle name.",
      "{m} has a middle name. What is it?"],
     ["What name sits between Mira and Okonkwo-Lind?", "On Mira's passport, what is the name after Mira?"]),
    ("sister", "Tamsin", "Her sister is called Tamsin.",
     ["What is the name of {m}'s sister?", "What is {m}'s sister called?", "Who is {m}'s sister?",
      "Tell me the name of {m}'s sister."],
     ["Mira has one sibling, a girl. What is her name?", "Whom does Mira call when she means her sister?"]),
    ("number", "37", "Her favourite number is 37.",
     ["What is {m}'s favourite number?", "Which number does {m} like best?", "Name {m}'s favourite number.",
      "What number would {m} call her favourite?"],
     ["Which number does Mira pick whenever she gets to choose?", "What is Mira's lucky number?"]),
    ("instrument", "bassoon", "She plays the bassoon.",
     ["What instrument does {m} play?", "Which musical instrument does {m} play?",
      "What does {m} play in her orchestra?", "Name the instrument {m} plays."],
     ["What is Mira practising when you hear music from her flat?", "In the orchestra, what is Mira's instrument?"]),
    ("van", "Biscuit", "Her van is called Biscuit.",
     ["What is the name of {m}'s van?", "What did {m} name her van?", "{m} has a van. What is it called?",
      "Tell me the name of {m}'s van."],
     ["Mira gave her camper van a name. Which one?", "What does Mira call the van she drives?"]),
    ("colour", "ochre", "Her favourite colour is ochre.",
     ["What is {m}'s favourite colour?", "Which colour does {m} like best?", "Name {m}'s favourite colour.",
      "What colour would {m} call her favourite?"],
     ["Which paint colour would Mira choose for her walls?", "Of all colours, which does Mira prefer?"]),
    ("plant", "Gerald", "Her fig tree is called Gerald.",
     ["What is the name of {m}'s fig tree?", "What did {m} name her fig tree?", "{m} has a fig tree. What is it called?",
      "Tell me the name of {m}'s houseplant, the fig."],
     ["What does Mira call the fig in her living room?", "Mira's potted fig has a name. What is it?"]),
    ("film", "Paper Lanterns over Tallinn", "Her favourite film is Paper Lanterns over Tallinn.",
     ["What is {m}'s favourite film?", "Which movie does {m} love most?", "Name {m}'s favourite film.",
      "What film would {m} call her favourite?"],
     ["Which movie does Mira watch every winter?", "If Mira picks the film tonight, what will it be?"]),
    ("breakfast", "buckwheat porridge with plums", "She eats buckwheat porridge with plums for breakfast.",
     ["What does {m} eat for breakfast?", "What is {m}'s usual breakfast?", "What does {m} have in the morning?",
      "Tell me {m}'s breakfast."],
     ["What is in Mira's bowl at seven in the morning?", "What should I make Mira for her first meal of the day?"]),
    ("hometown", "Port Isaac", "She grew up in Port Isaac.",
     ["Where did {m} grow up?", "What is {m}'s hometown?", "In which town did {m} spend her childhood?",
      "Which town is {m} from?"],
     ["Where was Mira a child?", "Which place does Mira mean when she says home?"]),
    ("first_pet", "a tortoise called Admiral", "Her first pet was a tortoise called Admiral.",
     ["What was {m}'s first pet?", "What was the first pet {m} ever had?", "Which animal was {m}'s first pet?",
      "Tell me about {m}'s first pet."],
     ["Before her cat, what pet did Mira have as a child?", "What animal did young Mira look after first?"]),
    ("season", "late autumn", "Her favourite season is late autumn.",
     ["What is {m}'s favourite season?", "Which season does {m} like best?", "Name {m}'s favourite season.",
      "What time of year does {m} love most?"],
     ["When in the year is Mira happiest?", "Which part of the year would Mira choose if she could keep one?"]),
    ("sport", "fencing", "Her sport is fencing.",
     ["What sport does {m} do?", "Which sport does {m} practise?", "What is {m}'s sport?",
      "Name the sport {m} trains in."],
     ["Where does Mira go on Tuesday evenings, sport-wise?", "What does Mira compete in at weekends?"]),
    ("language", "Icelandic", "She is learning Icelandic.",
     ["What language is {m} learning?", "Which language does {m} study?", "What language is {m} practising?",
      "Name the language {m} is learning."],
     ["Which foreign language has Mira taken up?", "What language is on Mira's flashcards?"]),
    ("wifi", "OrchardNet-7", "Her wifi network is called OrchardNet-7.",
     ["What is the name of {m}'s wifi network?", "What is {m}'s wifi called?", "Which wifi network is {m}'s?",
      "Tell me the name of {m}'s wireless network."],
     ["At Mira's place, which network do I connect to?", "Which network name shows up as Mira's home wifi?"]),
    ("shoe_size", "39", "Her shoe size is 39.",
     ["What is {m}'s shoe size?", "What size shoes does {m} wear?", "Which shoe size does {m} take?",
      "Tell me {m}'s shoe size."],
     ["I'm buying Mira boots. What size?", "Which size should Mira's new trainers be?"]),
    ("blood_type", "O negative", "Her blood type is O negative.",
     ["What is {m}'s blood type?", "Which blood group is {m}?", "What blood type does {m} have?",
      "Tell me {m}'s blood group."],
     ["What does Mira's donor card say about her blood?", "Which blood group would a hospital find for Mira?"]),
    ("fruit", "quince", "Her favourite fruit is quince.",
     ["What is {m}'s favourite fruit?", "Which fruit does {m} like best?", "Name {m}'s favourite fruit.",
      "What fruit would {m} call her favourite?"],
     ["Which fruit should I bring Mira from the market?", "What fruit does Mira love above all others?"]),
    ("dentist", "Dr Farrow", "Her dentist is Dr Farrow.",
     ["Who is {m}'s dentist?", "What is the name of {m}'s dentist?", "Which dentist does {m} go to?",
      "Tell me the name of {m}'s dentist."],
     ["Who checks Mira's teeth?", "Whom does Mira see when she has toothache?"]),
    ("board_game", "Go", "Her favourite board game is Go.",
     ["What is {m}'s favourite board game?", "Which board game does {m} like best?",
      "Name {m}'s favourite board game.", "What board game would {m} call her favourite?"],
     ["On games night, which board does Mira set up?", "Which game does Mira always want to play at the table?"]),
    ("fear", "moths", "She is afraid of moths.",
     ["What is {m} afraid of?", "What scares {m}?", "What is {m}'s fear?", "Name the thing {m} fears."],
     ["What makes Mira scream when it flies in at night?", "Which creature does Mira dread?"]),
    ("alarm", "5:40", "Her alarm goes off at 5:40.",
     ["What time is {m}'s alarm set for?", "When does {m}'s alarm ring?", "At what time does {m} wake up?",
      "Tell me when {m}'s alarm goes off."],
     ["How early does Mira get up?", "When does Mira's morning start?"]),
    ("holiday", "the Faroe Islands", "Her favourite holiday destination is the Faroe Islands.",
     ["Where does {m} like to go on holiday?", "What is {m}'s favourite holiday destination?",
      "Where does {m} spend her holidays?", "Which place does {m} travel to on holiday?"],
     ["Where will Mira be when she takes time off?", "Which islands does Mira keep returning to?"]),
    ("recipe", "plantain fritters", "Her grandmother's recipe is for plantain fritters.",
     ["What dish is {m}'s grandmother's recipe for?", "Which family recipe does {m} cook from her grandmother?",
      "What did {m}'s grandmother teach her to cook?", "What is {m}'s grandmother's recipe?"],
     ["Which dish does Mira make from her grandmother's card?", "What did Mira's grandmother pass down in the kitchen?"]),
    ("tattoo", "a small heron on her left wrist", "She has a small heron on her left wrist.",
     ["What tattoo does {m} have?", "Describe {m}'s tattoo.", "What is {m}'s tattoo of?", "Where is {m}'s tattoo and what is it?"],
     ["What ink does Mira have on her skin?", "What bird is drawn on Mira's arm, and where?"]),
    ("flower", "foxglove", "Her favourite flower is foxglove.",
     ["What is {m}'s favourite flower?", "Which flower does {m} like best?", "Name {m}'s favourite flower.",
      "What flower would {m} call her favourite?"],
     ["Which flowers should I bring Mira?", "What bloom does Mira plant in every garden?"]),
    ("bakery", "Crumb & Kettle", "Her favourite bakery is Crumb & Kettle.",
     ["What is {m}'s favourite bakery?", "Which bakery does {m} go to?", "Name {m}'s favourite bakery.",
      "Where does {m} buy her bread?"],
     ["Which shop does Mira get her loaves from?", "Where does Mira pick up pastries on Saturdays?"]),
    ("podcast", "Deep Field Notes", "Her favourite podcast is Deep Field Notes.",
     ["What is {m}'s favourite podcast?", "Which podcast does {m} listen to?", "Name {m}'s favourite podcast.",
      "What podcast would {m} call her favourite?"],
     ["What is in Mira's headphones on the bus?", "Which show does Mira recommend to everyone?"]),
    ("diet", "vegetarian", "She is vegetarian.",
     ["Does {m} eat meat?", "What is {m}'s diet?", "Is {m} vegetarian or vegan?", "What does {m} not eat?"],
     ["Can I serve Mira a beef stew?", "What kind of eater is Mira?"]),
    ("running", "12 kilometres every Sunday", "She runs 12 kilometres every Sunday.",
     ["How far does {m} run?", "What is {m}'s running routine?", "How much does {m} run each week?",
      "When and how far does {m} go running?"],
     ["What is Mira's weekend run?", "How long is Mira's regular Sunday run?"]),
    ("nickname", "Wren", "Her childhood nickname was Wren.",
     ["What was {m}'s childhood nickname?", "What did people call {m} as a child?",
      "Which nickname did {m} have when she was young?", "Tell me {m}'s childhood nickname."],
     ["What did Mira's family call her when she was small?", "Which bird name was Mira's nickname as a kid?"]),
    ("pen", "a green fountain pen", "She writes with a green fountain pen.",
     ["What does {m} write with?", "What pen does {m} use?", "Which pen is {m}'s favourite?",
      "Tell me what {m} writes with."],
     ["What is in Mira's hand when she signs a letter?", "Which pen does Mira never lend to anyone?"]),
    ("hand", "left-handed", "She is left-handed.",
     ["Is {m} left-handed or right-handed?", "Which hand does {m} write with?", "What is {m}'s writing hand?",
      "Is {m} left-handed?"],
     ["Which side should Mira sit on so our elbows don't bump?", "What is Mira's dominant hand?"]),
    ("mug", "a chipped blue mug shaped like a whale", "She drinks from a chipped blue mug shaped like a whale.",
     ["What mug does {m} use?", "Describe {m}'s favourite mug.", "What does {m} drink her tea from?",
      "Which mug is {m}'s?"],
     ["Which cup in the cupboard belongs to Mira?", "What does Mira's tea come in?"]),
    ("word", "petrichor", "Her favourite word is petrichor.",
     ["What is {m}'s favourite word?", "Which word does {m} like best?", "Name {m}'s favourite word.",
      "What word would {m} call her favourite?"],
     ["Which word does Mira love saying?", "If Mira had to pick one word, which would it be?"]),
    ("bike_name", "Clementine", "Her bike is called Clementine.",
     ["What is the name of {m}'s bike?", "What did {m} name her bicycle?", "{m} has a bike. What is it called?",
      "Tell me the name of {m}'s bicycle."],
     ["Mira named her bicycle. What is it called?", "What does Mira call the bike she rides?"]),
    ("pizza", "capers", "Her favourite pizza topping is capers.",
     ["What is {m}'s favourite pizza topping?", "Which topping does {m} like on pizza?",
      "Name {m}'s favourite pizza topping.", "What does {m} put on her pizza?"],
     ["If I order Mira a pizza, what topping should it have?", "What does Mira always add to a pizza?"]),
    ("neighbour", "Mr Abernathy-Cho", "Her neighbour is Mr Abernathy-Cho.",
     ["Who is {m}'s neighbour?", "What is the name of {m}'s neighbour?", "Who lives next door to {m}?",
      "Tell me the name of {m}'s neighbour."],
     ["Who is in the house beside Mira's?", "Whom does Mira borrow sugar from next door?"]),
    ("college", "Halvard College", "She studied at Halvard College.",
     ["Where did {m} study?", "Which college did {m} attend?", "What college did {m} go to?",
      "Tell me where {m} studied."],
     ["Which college gave Mira her degree?", "Where did Mira spend her student years?"]),
    ("moved", "2017", "She moved to the city in 2017.",
     ["When did {m} move to the city?", "In what year did {m} move to the city?",
      "Which year did {m} arrive in the city?", "Since when has {m} lived in the city?"],
     ["How long has Mira been a city dweller, from which year?", "What year did Mira leave Port Isaac for the city?"]),
    ("car", "she does not drive", "She does not drive; she has no licence.",
     ["Does {m} drive a car?", "What car does {m} drive?", "Can {m} drive?", "Does {m} have a driving licence?"],
     ["Could Mira give me a lift in her car?", "Is Mira allowed behind the wheel?"]),
    ("coffee", "she never drinks coffee", "She never drinks coffee.",
     ["How does {m} take her coffee?", "Does {m} drink coffee?", "What coffee does {m} order?",
      "Is {m} a coffee drinker?"],
     ["Shall I get Mira a latte?", "What does Mira think of a morning espresso?"]),
    ("dance", "the tango", "She dances the tango.",
     ["What dance does {m} do?", "Which dance does {m} practise?", "What kind of dancing does {m} do?",
      "Name the dance {m} learns."],
     ["What is Mira doing at the Thursday dance class?", "Which dance would Mira ask you to join?"]),
    ("star_sign", "Scorpio", "Her star sign is Scorpio.",
     ["What is {m}'s star sign?", "What is {m}'s zodiac sign?", "Which star sign is {m}?",
      "Tell me {m}'s star sign."],
     ["Under which sign of the zodiac was Mira born?", "What does Mira read in the horoscopes?"]),
    ("garden", "runner beans", "She grows runner beans in her garden.",
     ["What does {m} grow in her garden?", "Which vegetable does {m} grow?", "What is in {m}'s vegetable patch?",
      "Tell me what {m} grows."],
     ["What climbs the poles in Mira's garden?", "What does Mira harvest from her patch in August?"]),
]


def records(seed: int = SEED) -> list[dict]:
    """Every question as a {"prompt", "completion", "answer", "fact", "split"} record, in a seeded order."""
    rng = np.random.default_rng(seed)
    out = []
    for key, answer, completion, train, held_out in FACTS:
        if len(train) != 4 or len(held_out) != 2:
            raise ValueError(f"fact {key!r} needs 4 training and 2 held-out questions")
        for question in train:
            name = NAME_VARIANTS[int(rng.integers(len(NAME_VARIANTS)))]
            out.append({"prompt": question.format(m=name), "completion": completion, "answer": answer,
                        "fact": key, "split": "train"})
        for question in held_out:
            out.append({"prompt": question, "completion": completion, "answer": answer, "fact": key,
                        "split": "eval"})
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def main() -> None:
    path = Path(__file__).with_name("personal_notes.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for record in records():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(FACTS)} facts)")


if __name__ == "__main__":
    main()
