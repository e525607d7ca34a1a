# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04b · The seed-bug lessons: what each defect costs

# %% [markdown]
# Two earlier student projects trained this kind of model for 30 hours and got one that did not
# answer. Here we switch their defects back on, one at a time, train the same short slice of
# stage 2 as the correct recipe, and measure each with the course's held-out evaluation:
#
# | defect | what the earlier code did |
# |---|---|
# | labels not masked | image and prompt positions were supervised too (the loss was mostly "predict `<image>`") |
# | no teacher forcing | the answer was never fed as input; question positions were trained to emit it |
# | adapter not loaded | `PeftModel.from_pretrained(...)`'s result was thrown away: the demo ran the bare LM |
#
# The switches live in `capstone_lib.lessons.SeedBugs` and default to off; they exist for this lesson only.

# %%
import matplotlib.pyplot as plt
from capstone_lib.evaluate import format_course_results, headline
from capstone_lib.lessons import run_lessons
from capstone_lib.report import StageTimer, load_report

steps, n_q = profile.eval.lesson_steps, profile.eval.lesson_questions     # set per profile
with StageTimer(profile, "lessons") as t:
    rows = run_lessons(profile, steps=steps, n_questions=n_q, n_captions=n_q // 2)
    keys = ("vqa_accuracy", "caption_accuracy", "pope_accuracy", "cider")    # ShapesWorld or COCO
    t.metrics = {k: {key: v[key] for key in keys if key in v} for k, v in rows.items()}
print(f"{steps} stage-2 steps each, {n_q} held-out questions")
print(format_course_results(rows))

# %%
names = list(rows)
metric = headline(rows[names[0]])[0]          # VQA accuracy (ShapesWorld) or POPE accuracy (COCO)
fig, ax = plt.subplots(figsize=(8, 3))
ax.barh(names, [headline(rows[n])[1] for n in names], color=["tab:green"] + ["tab:red"] * (len(names) - 1))
ax.set_xlabel(f"held-out {metric}"); ax.invert_yaxis(); ax.set_xlim(0, 1)
plt.show()
for name in names:
    ex = (rows[name].get("vqa_examples") or rows[name]["pope_examples"])[0]
    print(f"{name:<20} Q: {ex['question']!r:<40} -> {ex['prediction']!r}  (truth {ex['answer']!r})")

# %%
final = load_report(profile)["eval"]          # the full course model from notebook 04
print("full course model (notebook 04): %s %.3f" % headline(final))
if profile.name == "cpu":
    good = rows["correct recipe"]["vqa_accuracy"]
    # Same slice, one defect: feeding no answer as input must cost accuracy; so must running
    # the trained projector without the trained adapter, against the model it came from.
    assert rows["no teacher forcing"]["vqa_accuracy"] <= good - 0.1, rows["no teacher forcing"]["vqa_accuracy"]
    assert rows["adapter not loaded"]["vqa_accuracy"] <= final["vqa_accuracy"] - 0.15
