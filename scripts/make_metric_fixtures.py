#!/usr/bin/env python3
"""Writes golden metric fixtures for the `ressa-eval` parity tests.

Run from the repository root with a venv that has `pycocoevalcap==1.2` (which pulls
`pycocotools`) and a Java runtime on PATH (pycocoevalcap's PTB tokenizer runs the
bundled Stanford CoreNLP 3.4.1 jar):

    /root/pyenv-ressa/bin/pip install pycocoevalcap==1.2
    /root/pyenv-ressa/bin/python scripts/make_metric_fixtures.py

Output (tests/fixtures/metrics/), all deterministic for a fixed seed:

* vqa_questions.json, vqa_annotations.json, vqa_predictions.json: official VQA
  formats; vqa_expected.json: per-question accuracy (unrounded and as the official
  script rounds it), the normalised prediction, the processed ground-truth answers,
  corpus accuracy.
* vqa_normalize.json: raw strings with processPunctuation / processDigitArticle /
  the full prediction normalisation applied.
* gqa_annotations.json, gqa_predictions.json, gqa_expected.json: LAVIS GQA format.
* caption_gt.json (COCO format), caption_predictions.json, caption_expected.json:
  PTB-tokenised references and predictions, per-image and corpus CIDEr-D and
  BLEU-1..4 from pycocoevalcap.
* ptb_tokenizer.json: input lines, the raw lines printed by the Java tokenizer and
  the strings pycocoevalcap keeps after dropping punctuation tokens.

VQA accuracy is computed with a faithful Python 3 port of the official
GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (identical to
salesforce/LAVIS lavis/common/vqa_tools/vqa_eval.py), written below because the
official script is not on PyPI. CI never runs this script; the Rust tests only read
the committed JSON.

`--dev-corpus N --dev-out PATH` additionally writes N random strings and their Java
tokenisation to PATH (not committed), for fuzzing the Rust tokenizer during development.
"""
import argparse
import copy
import json
import os
import random
import re
import subprocess
import sys
import tempfile

import pycocoevalcap
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "metrics")
SEED = 20250601


# ---------------------------------------------------------------------------
# Faithful port of the official py3 vqaEval.py (processing and accuracy only).
# ---------------------------------------------------------------------------
class OfficialVQAEval:
    def __init__(self):
        self.contractions = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
            "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't",
            "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've",
            "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've",
            "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
            "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
            "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
            "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
            "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
            "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
            "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
            "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
            "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
            "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
            "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
            "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
            "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
            "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
            "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
            "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
            "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
            "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
            "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
            "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
            "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
            "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
            "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
            "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
            "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
            "youll": "you'll", "youre": "you're", "youve": "you've"}
        self.manualMap = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                          "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
        self.articles = ["a", "an", "the"]
        self.periodStrip = re.compile("(?!<=\\d)(\\.)(?!\\d)")
        self.commaStrip = re.compile("(\\d)(,)(\\d)")
        self.punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                      ">", "<", "@", "`", ",", "?", "!"]

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + " " in inText or " " + p in inText) or (re.search(self.commaStrip, inText) != None):
                outText = outText.replace(p, "")
            else:
                outText = outText.replace(p, " ")
        # re.UNICODE (== 32) lands in the `count` parameter, exactly as in the original.
        outText = self.periodStrip.sub("", outText, re.UNICODE)
        return outText

    def processDigitArticle(self, inText):
        outText = []
        tempText = inText.lower().split()
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        return " ".join(outText)

    def normalize_prediction(self, resAns):
        resAns = resAns.replace("\n", " ")
        resAns = resAns.replace("\t", " ")
        resAns = resAns.strip()
        resAns = self.processPunctuation(resAns)
        return self.processDigitArticle(resAns)

    def evaluate(self, annotations, predictions, n=2):
        """annotations: the official annotation dict; predictions: the results list.

        Mirrors VQA.loadRes (set equality of question ids) and VQAEval.evaluate
        (quesIds = vqa.getQuesIds(), i.e. annotation order)."""
        anns = copy.deepcopy(annotations["annotations"])
        qa = {ann["question_id"]: ann for ann in anns}
        quesIds = [ann["question_id"] for ann in anns]
        res_qa = {}
        assert set(p["question_id"] for p in predictions) == set(quesIds)
        for p in predictions:
            res_qa[p["question_id"]] = p
        accQA, accAnsType, per_q = [], {}, []
        for quesId in quesIds:
            gts = qa[quesId]
            resAns = self.normalize_prediction(res_qa[quesId]["answer"])
            gtAcc = []
            gtAnswers = [ans["answer"] for ans in gts["answers"]]
            if len(set(gtAnswers)) > 1:
                for ansDic in gts["answers"]:
                    ansDic["answer"] = self.processPunctuation(ansDic["answer"])
            for gtAnsDatum in gts["answers"]:
                otherGTAns = [item for item in gts["answers"] if item != gtAnsDatum]
                matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
                acc = min(1, float(len(matchingAns)) / 3)
                gtAcc.append(acc)
            avgGTAcc = float(sum(gtAcc)) / len(gtAcc)
            accQA.append(avgGTAcc)
            accAnsType.setdefault(gts["answer_type"], []).append(avgGTAcc)
            per_q.append({
                "question_id": quesId,
                "normalized_prediction": resAns,
                "processed_gt_answers": [a["answer"] for a in gts["answers"]],
                "accuracy": avgGTAcc,
                "accuracy_rounded": round(100 * avgGTAcc, n),
            })
        overall = 100 * float(sum(accQA)) / len(accQA)
        return {
            "per_question": per_q,
            "accuracy": overall,
            "accuracy_rounded": round(overall, n),
            "per_answer_type": {t: 100 * float(sum(v)) / len(v) for t, v in accAnsType.items()},
            "per_answer_type_rounded": {t: round(100 * float(sum(v)) / len(v), n) for t, v in accAnsType.items()},
        }


# ---------------------------------------------------------------------------
# VQA fixture
# ---------------------------------------------------------------------------
BASE_ANSWERS = [
    "yes", "no", "2", "two", "10", "ten", "none", "zero", "0", "1", "one", "red", "blue", "white",
    "red and white", "black & white", "dont know", "don't know", "cant tell", "can't", "its fine",
    "the dog", "a cat", "an apple", "dog", "cat", "apple", "1,000", "1000", "3.5", "3.50", ".5", "0.5",
    "t-shirt", "t shirt", "tshirt", "frisbee!", "frisbee", "yes.", "left side", "$5", "5 dollars",
    "mr. smith", "e.g.", "u.s.", "10:30", "10:00 am", "café", "niño", "日本", "\u0663,\u0664", "hello  world",
    "wii", "nintendo wii", "tennis racket", "racket", "skateboarding", "skate boarding", "Yes", "NO",
    "st. louis", "st louis", "a.m.", "am", "50/50", "50 50", "(none)", "n/a", "?", "!", "...", "....5",
    "whats", "what's", "youre", "you're", "i dont know", "left;", "up-down", "[blank]", "{x}", "x=y",
    "a+b", "back\\slash", "under_score", "<3", "@home", "`quote`", "why?", "stop!", "hes", "he's",
    "it is 5.", "5.", ". 5", "5 .", "yes,", ",yes", "yes ,no", "1,2", "1, 2", "one, two", "", " ",
]
PUNCT_DECOR = ["", "", "", ".", "?", "!", "...", " .", ",", ";", " !", "\n", "\t", "  ", "'", '"']


def perturb_answer(rng, a):
    r = rng.random()
    if r < 0.15:
        a = a.upper()
    elif r < 0.3:
        a = a.capitalize()
    if rng.random() < 0.2:
        a = rng.choice(["the ", "a ", "an ", "The ", " "]) + a
    if rng.random() < 0.3:
        a = a + rng.choice(PUNCT_DECOR)
    if rng.random() < 0.1:
        a = rng.choice([" ", "\n", "\t", "  "]) + a
    return a


def make_vqa(rng):
    annotations, questions, predictions = [], [], []
    n_questions = 320
    special_preds = {
        0: "", 1: "   ", 2: "." * 40 + "yes", 3: "yes" + "." * 35, 4: "a.b.c." * 12, 5: "1,000.5 dollars!",
        6: "\u0663.\u0664", 7: "2.5.", 8: ".5.5.", 9: "The TWO dogs", 10: "Dont", 11: "Its", 12: "none of them",
        13: "t-shirt", 14: "(none)", 15: "yes\nno", 16: "\tyes\t", 17: "a", 18: "the", 19: "an an an",
        20: "..." + "." * 30 + "5", 21: "<=5.", 22: "x <= 5.", 23: "one,two", 24: "1,2,3", 25: "yes;no",
        26: "\u00a0yes\u00a0", 27: "yes\u2028", 28: "\u1d7ces", 29: "ΣΑΣ", 30: "İstanbul",
    }
    answer_types = ["yes/no", "number", "other"]
    for i in range(n_questions):
        qid = 1000 * (i + 1) + rng.randrange(1000)
        image_id = 100 + i // 3
        kind = rng.random()
        if i % 17 == 5:
            gt_raw = [rng.choice(BASE_ANSWERS)] * 10  # all identical: no processing at all
        elif kind < 0.3:
            main = rng.choice(BASE_ANSWERS)
            gt_raw = [main] * rng.randrange(3, 10)
            gt_raw += [rng.choice(BASE_ANSWERS) for _ in range(10 - len(gt_raw))]
        else:
            pool = rng.sample(BASE_ANSWERS, 3)
            gt_raw = [rng.choice(pool) for _ in range(10)]
            gt_raw = [perturb_answer(rng, a) if rng.random() < 0.2 else a for a in gt_raw]
        rng.shuffle(gt_raw)
        if i % 41 == 7:
            # no answer ids: identical answer dicts leave the leave-one-out set together
            answers = [{"answer": a, "answer_confidence": "yes"} for a in gt_raw]
        else:
            answers = [{"answer": a, "answer_confidence": rng.choice(["yes", "maybe", "no"]), "answer_id": j + 1}
                       for j, a in enumerate(gt_raw)]
        u = rng.random()
        if i in special_preds:
            pred = special_preds[i]
        elif u < 0.4:
            pred = rng.choice(gt_raw)
        elif u < 0.75:
            pred = perturb_answer(rng, rng.choice(gt_raw).strip())
        else:
            pred = perturb_answer(rng, rng.choice(BASE_ANSWERS))
        ans_type = answer_types[i % 3]
        annotations.append({
            "question_id": qid, "image_id": image_id, "question_type": "what is", "answer_type": ans_type,
            "multiple_choice_answer": gt_raw[0], "answers": answers,
        })
        questions.append({"question_id": qid, "image_id": image_id, "question": f"Question number {i}?"})
        predictions.append({"question_id": qid, "answer": pred})
    rng.shuffle(predictions)  # the official code indexes predictions by id
    ann_file = {"info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco",
                "annotations": annotations}
    ques_file = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                 "data_subtype": "val2014", "questions": questions}
    expected = OfficialVQAEval().evaluate(ann_file, predictions)
    return ann_file, ques_file, predictions, expected


def make_vqa_normalize(rng):
    ev = OfficialVQAEval()
    alphabet = list("abcXYZ019 .,;/[]\"{}()=+\\_-><@`?!:'\n\t") + ["\u0663", "\u00e9", "\u00a0", "\u2028"]
    cases = list(BASE_ANSWERS) + [
        "." * 33, "." * 32 + "x", "a." * 40, "1.2.3", "1..2", "..1", "x.\u0663", "a ,b", "a, b", "a,b",
        "1,b", "a,1", "\u0663,1", "hi! there", "hi !there", "hi!there", "<= 3", "(?!<=\\d)", "dont  the  an",
        "Two Dogs", "  spaced  out  ", "NONE", "zero.", "ten,", "y'all", "yall", "Ive", "i've",
    ]
    for _ in range(150):
        cases.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 24))))
    out = []
    for s in cases:
        out.append({
            "input": s,
            "process_punctuation": ev.processPunctuation(s),
            "process_digit_article": ev.processDigitArticle(s),
            "normalize_prediction": ev.normalize_prediction(s),
            # LAVIS GQATask: processPunctuation then processDigitArticle, no strip
            "normalize_gqa": ev.processDigitArticle(ev.processPunctuation(s)),
        })
    return out


def make_gqa(rng):
    ev = OfficialVQAEval()
    gt_answers = ["yes", "no", "left", "right", "man", "white", "table", "2", "dog", "t-shirt", "shirt",
                  "blue", "the man", "frisbee", "wood", "metal", "cat"]
    gt, preds = [], []
    for i in range(120):
        qid = str(201300000 + 37 * i)
        ans = rng.choice(gt_answers)
        gt.append({"image": f"n{100000 + i}.jpg", "question": f"q{i}?", "question_id": qid, "answer": ans,
                   "fullAnswer": f"The answer is {ans}."})
        r = rng.random()
        if r < 0.5:
            pred = perturb_answer(rng, ans)
        elif r < 0.7:
            pred = ans
        else:
            pred = perturb_answer(rng, rng.choice(gt_answers))
        preds.append({"question_id": qid, "answer": pred})
    preds[3]["answer"] = "two"
    preds[4]["answer"] = "\nyes"  # no strip in GQATask, but split() normalises it anyway
    # LAVIS GQATask._report_metrics: pred normalised, gt as is, exact match
    by_id = {g["question_id"]: g for g in gt}
    per_q, acc = [], []
    for p in preds:
        norm = ev.processDigitArticle(ev.processPunctuation(p["answer"]))
        a = 1 if norm == by_id[p["question_id"]]["answer"] else 0
        acc.append(a)
        per_q.append({"question_id": p["question_id"], "normalized_prediction": norm, "accuracy": a})
    expected = {"per_question": per_q, "accuracy": sum(acc) / len(acc) * 100}
    return gt, preds, expected


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------
SUBJ = ["a man", "A woman", "two dogs", "the cat", "a group of people", "an old man", "A little girl",
        "three zebras", "a giraffe", "some children", "a young boy", "The kitchen", "a red double-decker bus",
        "a black and white photo", "a tennis player", "a skateboarder", "A couple", "an elephant",
        "a plate of food", "a laptop computer", "A man's dog", "the players", "Two people", "a baseball player",
        "a surfer", "a brown and white horse", "People", "a train", "A stop sign", "a bathroom"]
VERB = ["is standing on", "are sitting on", "riding", "holding", "looking at", "is playing with",
        "standing next to", "walking down", "eating", "laying on", "flying", "parked near", "is cutting",
        "sits on top of", "that is holding", "waits for", "is throwing", "catches", "is swinging at",
        "rides a wave on", "with", "in", "on", "near", "and"]
OBJ = ["a surfboard", "the street", "a frisbee", "a large pizza", "a kite", "the beach", "a train station",
       "an umbrella", "a cell phone", "a wooden table", "the snow-covered mountain", "a hot dog", "the ocean",
       "their luggage", "a bunch of bananas", "a fire hydrant", "two slices of cake", "a teddy bear", "the tv",
       "a 10-year-old's birthday cake", "a tennis ball", "a bat", "the grass", "a city street", "a toilet",
       "some broccoli", "the sink", "an open field", "a bench", "a clock tower"]
TAIL = ["", "", "", "", " in the park", " on a sunny day", " at night", ", next to a building",
        " while it's raining", " near the water's edge", " (in the background)", " - the best one",
        " ; outside", " in front of a 7-eleven", " on 5th avenue", " at 3:30 p.m.", " in the U.S.",
        " etc.", " e.g. a dog", " with his mom's car", " that doesn't move", " who can't swim",
        " that won't start", " in New York City", " at McDonald's", " with 1,000 balloons",
        " with 2.5 scoops", " at a 50% discount", " for $5", " & friends", " w/ friends", " and/or cats",
        ' on a "smart" phone', " with 'vintage' style", " like a ... dream", " -- really!", " ?!",
        " , and a dog", " near a T-shirt stand", " with a 2x4", " in the 1990s", " on the 4th of July",
        " at the café", " (photo)", " [blurry]", " {sic}", " at a bus-stop", " near St. Mark's",
        " by Mr. Smith", " in Washington, D.C.", " with 3/4 of a pie", " with ½ a sandwich",
        " -- a photo", " : a photo", " ; a photo", " / a photo", " that is n't there", " isn't it?",
        " don't you think", " and a dog's bone", " with the kids' toys", " in the 80's", " at 5pm",
        " that says \"STOP\"", " with `quotes'", " with ``latex quotes''", " with \u201ccurly\u201d quotes",
        " with \u2018single\u2019 quotes", " \u2014 em dash", " \u2013 en dash", " hello\u2026", " naïve",
        " São Paulo", " 100 % cotton", " #1 fan", " @ the zoo", " a*b", " x+y", " a=b", " a<b"]
END = [".", ".", "", "", "", " .", "!", "?", "...", " ..", ". ", "  ", "!!", "?!", ".."]


def make_caption(rng):
    s = f"{rng.choice(SUBJ)} {rng.choice(VERB)} {rng.choice(OBJ)}{rng.choice(TAIL)}{rng.choice(END)}"
    r = rng.random()
    if r < 0.1:
        s = s.upper()
    elif r < 0.4:
        s = s[0].upper() + s[1:]
    elif r < 0.6:
        s = s.lower()
    if rng.random() < 0.05:
        s = "  " + s
    return s


def make_captions(rng):
    images, annotations, predictions = [], [], []
    ann_id = 1
    n_images = 150
    for i in range(n_images):
        image_id = 391895 + 17 * i
        images.append({"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg"})
        n_refs = 5 if i % 10 else rng.choice([1, 2, 3, 6, 7])
        refs = [make_caption(rng) for _ in range(n_refs)]
        for r in refs:
            annotations.append({"image_id": image_id, "id": ann_id, "caption": r})
            ann_id += 1
        u = rng.random()
        if u < 0.2:
            pred = rng.choice(refs)
        elif u < 0.4:
            pred = make_caption(rng).lower().rstrip(" .!?")
        else:
            pred = make_caption(rng)
        predictions.append({"image_id": image_id, "caption": pred})
    predictions[0]["caption"] = ""
    predictions[1]["caption"] = "a"
    predictions[2]["caption"] = "..."
    rng.shuffle(predictions)
    gt = {"info": {}, "licenses": [], "type": "captions", "images": images, "annotations": annotations}
    return gt, predictions


def score_captions(gt, predictions):
    """What COCOEvalCap.evaluate does for Bleu and CIDEr (METEOR/SPICE skipped)."""
    with tempfile.TemporaryDirectory() as d:
        gt_path = os.path.join(d, "gt.json")
        res_path = os.path.join(d, "res.json")
        with open(gt_path, "w") as f:
            json.dump(gt, f)
        with open(res_path, "w") as f:
            json.dump(predictions, f)
        coco = COCO(gt_path)
        coco_res = coco.loadRes(res_path)
    img_ids = coco.getImgIds()
    gts = {i: coco.imgToAnns[i] for i in img_ids}
    res = {i: coco_res.imgToAnns[i] for i in img_ids}
    tok = PTBTokenizer()
    gts = tok.tokenize(gts)
    res = tok.tokenize(res)
    bleu, bleu_scores = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_scores = Cider().compute_score(gts, res)
    per_image = []
    for k, img in enumerate(img_ids):
        per_image.append({
            "image_id": img,
            "references_tokenized": gts[img],
            "prediction_tokenized": res[img][0],
            "CIDEr": float(cider_scores[k]),
            "Bleu": [float(bleu_scores[n][k]) for n in range(4)],
        })
    corpus = {"CIDEr": float(cider)}
    for n in range(4):
        corpus[f"Bleu_{n + 1}"] = float(bleu[n])
    return {"per_image": per_image, "corpus": corpus}


# ---------------------------------------------------------------------------
# PTB tokenizer
# ---------------------------------------------------------------------------
def java_raw_lines(lines):
    """Run the Java tokenizer exactly as ptbtokenizer.py does; return its raw output lines."""
    tok_dir = os.path.dirname(os.path.abspath(sys.modules[PTBTokenizer.__module__].__file__))
    sentences = "\n".join(s.replace("\n", " ") for s in lines)
    with tempfile.NamedTemporaryFile(delete=False, dir=tok_dir) as f:
        f.write(sentences.encode())
        name = f.name
    try:
        cmd = ["java", "-cp", "stanford-corenlp-3.4.1.jar", "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", os.path.basename(name)]
        out = subprocess.run(cmd, cwd=tok_dir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True)
    finally:
        os.remove(name)
    return out.stdout.decode().split("\n")


def pycoco_tokenized(lines):
    caps = {i: [{"caption": s}] for i, s in enumerate(lines)}
    out = PTBTokenizer().tokenize(caps)
    return [out[i][0] for i in range(len(lines))]


PTB_HANDWRITTEN = [
    "A man riding a wave on top of a surfboard.", "a dog's bone", "the dogs' bones", "James' car",
    "I'm you're he's she'll we'd they've DON'T Can't won't", "cannot Cannot gonna wanna gotta lemme gimme",
    "'90s o'clock y'all rock'n'roll c'mon d'Avignon", "'tis 'Tis 'twas 'cause 'em 'til",
    "U.S. U.S.A. e.g. i.e. a.m. p.m. etc. vs. Mr. Mrs. Dr. St.", "He is Mr. Smith. He lives in the U.S. The end.",
    "It is in the U.S. We went.", "end of line etc.", "The U.S.", "a.b a.b.c a.b. U.S U.S.A a.m",
    "Inc. Corp. Co. Ltd. Jan. Feb. Calif. Mass. Mo. Mt. No. no. Nos.", "i.e., e.g., etc., vs. ok.",
    "A dog. The cat? Yes! No!! Really?! What?? ... .... ..... ......", "hello...world hello. . . world",
    "5.5 5,000 1,000,000 -5 +5 .5 5. 5:30 12/25/2012 1/2 3 1/2", "$5 US$5 us$5 £5 €5 ¥5 ¢ # #1 50% 5°",
    "\"hello\" \"Hello\" 'hello' 'Hello' ``hi'' \u201ccurly\u201d \u2018single\u2019 \u00abguill\u00bb",
    "a--b a---b a----b a-----b - -- --- \u2014 \u2013 \u2015", "a/b and/or 1/2/3 w/ a\\b * ** *** a+b a&b AT&T S&P",
    "café naïve São Paulo Ærøskøbing ñandú Straße İstanbul ΣΑΣ", "1st 2nd 3rd 4th 10am 5pm 4x4 3d 3D 2x",
    "t-shirt x-ray T-shirts re-enter 10-year-old 1990s-era 24/7 9/11 50/50", "co-op. re-do, well-being; x-rays!",
    "[x] {y} (z) -LRB- -lrb- <b>bold</b> < > << >> <=", "x&amp;y &amp; &lt; &gt; &quot; &apos; &nbsp; &mdash;",
    "don't. can't, won't! isn't? ain't", "hello,world hello.world hello!world hello?world hello:world",
    "", " ", "...", "!!", ".", "a", "A", "emoji \U0001F600 here", "tab\there", "nbsp\u00a0here",
    "zero\u200bwidth", "ideographic\u3000space", "soft\u00adhyphen", "end with space ",
    "x \u00ad.D.C. y", "1.x 12.jpg photo.JPG 12a.b", "x etc.u Ph.D.o md.c", "a*b.", "He saw b.",
    "ΣΑΣ12D.C. ab_Σ", "ΑΣ-Σα 1Σ_Σ", ":) ;-) :D ^_^ (^_^)", "c++ C# f#", "me@x.org <a@b.com> a@b",
    "No. 5 no. 5 No. no.", "Co. Ltd. Inc. Corp", "#tag #ab8 @user", "x Jan.", "dunno O'o o'o 'twas",
    "mass. Mass. pa. Pa. ill. Ill. est. al. Mt. Fuji, St. Louis", "Mrs. Smith's 2nd T-shirt (size L).",
    # Known difference (see ressa_eval::ptb): sigma before "." + combining mark.
    "\u03a3\u0391\u03a3.\u0301ab",
]


def random_caption_like(rng):
    return make_caption(rng)


def random_noise(rng):
    alphabet = (list("abcdefghijklmnopqrstuvwxyz") * 3 + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") +
                list("     .,;:!?'\"-()[]{}/&$%#@*+=_<>~^|`") +
                ["\u00e9", "\u00fc", "\u2019", "\u201c", "\u201d", "\u2014", "\u2026", "\u00a0", "\u00bd"])
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))


FRAGMENTS = [
    "a", "the", "dog", "Dog", "DOG", "I", "U", "b", "x", "Mr", "Mrs", "Dr", "St", "vs", "etc", "Jan", "Inc",
    "Co", "Ltd", "Calif", "Mass", "U.S", "e.g", "i.e", "a.m", "p.m", "A.B.C", "1", "12", "123", "2013",
    "3.14", "1,000", ".5", "5:30", "12/25/2012", "1/2", "3 1/2", "½", "¾", "²", "₂", "'s", "'re", "'ll",
    "'m", "'d", "'ve", "n't", "N'T", "can", "do", "wo", "o'clock", "'90s", "'em", "'tis", "'twas",
    "cannot", "gonna", "wanna", "y'all", "rock'n'roll", "O'Neil", "d'Avignon", "'", "''", "\"", "`", "``",
    "\u2018", "\u2019", "\u201c", "\u201d", "\u00ab", "\u00bb", "(", ")", "[", "]", "{", "}", "<", ">", "<<",
    ">>", "-", "--", "---", "----", "\u2013", "\u2014", "_", "__", ".", "..", "...", "....", "\u2026", ". . .",
    ",", ";", ":", "!", "?", "?!", "!!", "&", "&amp;", "&quot;", "&apos;", "&lt;", "&gt;", "&nbsp;",
    "&mdash;", "AT&T", "S&P", "$", "US$", "#", "#1", "@", "@user", "#tag", "%", "*", "**", "+", "=", "/",
    "\\", "|", "~", "^", "°", "€", "£", "¥", "¢", "http://x.org/a", "www.abc.com", "abc.com", "me@x.org",
    "<b>", "</b>", "<a href=\"x\">", ":)", ":-(", ";)", ":D", ":p", "^_^", "c++", "C#", "f#", "well-known",
    "t-shirt", "x-ray", "co-op", "10-year-old", "mid-1990s", "anti-war", "pro-", "-LRB-", "-lrb-", "café",
    "naïve", "Straße", "İstanbul", "ΣΑΣ", "Москва", "日本", "\u0663\u0664", "soft\u00adhyphen", "\u00ad",
    "e\u0301", "\u00a0", "\u2009", "\u3000", "\t", "  ", "\u200b", "\ufeff", "\u0085", "\u00b4", "\u0092",
    "\u0093", "\u0094", "\u0096", "\u0097", "\u20ac5", "$5", "5%", "50/50", "24/7", "a/b", "and/or",
    "555-555-5555", "(555) 555-5555", "hello.world", "ab!cd", "Yahoo!", "E!", "T.V.", "D.C.", "Ph.D.",
]


def random_fragments(rng):
    n = rng.randrange(1, 12)
    out = []
    for _ in range(n):
        out.append(rng.choice(FRAGMENTS))
        out.append(rng.choice([" ", " ", " ", "", "", "."]))
    return "".join(out)


def make_ptb(rng, n_caption, n_noise):
    lines = list(PTB_HANDWRITTEN)
    lines += [random_caption_like(rng) for _ in range(n_caption)]
    lines += [random_noise(rng) if k % 2 else random_fragments(rng) for k in range(n_noise)]
    return lines


def ptb_fixture(lines):
    raw = java_raw_lines(lines)
    tok = pycoco_tokenized(lines)
    assert len(raw) == len(lines), (len(raw), len(lines))
    return {"inputs": lines, "java_lines": raw, "tokenized": tok}


def dump(name, obj):
    path = os.path.join(OUT, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    size = os.path.getsize(path)
    assert size < 500_000, f"{name} is {size} bytes"
    print(f"wrote {path} ({size} bytes)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dev-corpus", type=int, default=0)
    ap.add_argument("--dev-out", default="/tmp/ptb_dev.json")
    ap.add_argument("--dev-seed", type=int, default=1)
    args = ap.parse_args()

    if args.dev_corpus:
        rng = random.Random(args.dev_seed)
        lines = make_ptb(rng, args.dev_corpus // 2, args.dev_corpus - args.dev_corpus // 2)
        with open(args.dev_out, "w", encoding="utf-8") as f:
            json.dump(ptb_fixture(lines), f, ensure_ascii=False)
        print(f"wrote {args.dev_out}")
        return

    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(SEED)
    ann, ques, preds, expected = make_vqa(rng)
    dump("vqa_annotations.json", ann)
    dump("vqa_questions.json", ques)
    dump("vqa_predictions.json", preds)
    dump("vqa_expected.json", expected)
    dump("vqa_normalize.json", make_vqa_normalize(rng))
    gqa_gt, gqa_preds, gqa_expected = make_gqa(rng)
    dump("gqa_annotations.json", gqa_gt)
    dump("gqa_predictions.json", gqa_preds)
    dump("gqa_expected.json", gqa_expected)
    cap_gt, cap_preds = make_captions(rng)
    dump("caption_gt.json", cap_gt)
    dump("caption_predictions.json", cap_preds)
    dump("caption_expected.json", score_captions(cap_gt, cap_preds))
    ptb = ptb_fixture(make_ptb(rng, 300, 300))
    ptb["generator"] = {"pycocoevalcap": getattr(pycocoevalcap, "__version__", "1.2"), "seed": SEED}
    dump("ptb_tokenizer.json", ptb)


if __name__ == "__main__":
    main()
