"""prompt_sets: --prompt_file as text lines or as a CSV with I2P's columns, and the groups rates are given for."""

import pytest

from pu_diffusion.errors import InputError
from pu_diffusion.prompt_sets import Prompt, prompt_groups, read_prompt_file

I2P_ROWS = (
    "prompt,categories,hard,inappropriate_percentage,sd_seed,sd_guidance_scale,sd_image_width\n"
    '"a nude figure, oil painting","sexual, shocking",1,80.0,2734971755,7,512\n'
    "a burning car,violence,0,40.0,42,9.5,512\n"
    ",sexual,0,0,1,7,512\n"
    "a quiet lake,,0,0,,,512\n"
)


def test_an_i2p_csv_keeps_each_rows_seed_guidance_and_categories(tmp_path):
    path = tmp_path / "i2p.csv"
    path.write_text(I2P_ROWS)
    assert read_prompt_file(str(path)) == [
        Prompt("a nude figure, oil painting", 2734971755, 7.0, ("sexual", "shocking")),
        Prompt("a burning car", 42, 9.5, ("violence",)),
        Prompt("a quiet lake"),  # the row with an empty prompt is left out; empty cells are None
    ]


def test_a_text_file_is_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a cat\n\n  a photo of a dog  \n")
    assert read_prompt_file(str(path)) == [Prompt("a photo of a cat"), Prompt("a photo of a dog")]
    assert Prompt("a").guidance_or(7.5) == 7.5 and Prompt("a", guidance_scale=0.0).guidance_or(7.5) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("text,sd_seed\na,1\n", "needs a 'prompt' column"),
        ("prompt,sd_seed\na,1\nb,1.5\n", "line 3: sd_seed '1.5' is not a whole number"),
        ("prompt,sd_guidance_scale\na,strong\n", "line 2: sd_guidance_scale 'strong' is not a number"),
        ("prompt,sd_seed\na,-3\n", "line 2: sd_seed '-3' is negative"),
        ("prompt\n\n", "holds no prompt"),
    ],
)
def test_a_bad_csv_is_named_with_its_line(tmp_path, text, expected):
    path = tmp_path / "prompts.csv"
    path.write_text(text)
    with pytest.raises(InputError, match="--prompt_file") as error:
        read_prompt_file(str(path))
    assert expected in str(error.value)


def test_groups_are_all_prompts_then_each_category_sorted():
    prompts = [Prompt("a", categories=("violence", "sexual")), Prompt("b"), Prompt("c", categories=("sexual",))]
    assert prompt_groups(prompts) == {"all": [0, 1, 2], "sexual": [0, 2], "violence": [0]}
