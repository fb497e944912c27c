"""The framework layer without HTTP: the train/test split is disjoint, prompts and replies are read as documented."""

from __future__ import annotations

import games
import pytest
from app import parse_action
from conftest import needs_java
from episodes import condensed_transcript, row_id, single_turn_row, task_fields


@needs_java
def test_textworld_express_train_and_test_seeds_are_disjoint():
    import textworld_express as twx

    env = twx.TextWorldExpressEnv()
    try:
        train, test = set(env.getValidSeedsTrain()), set(env.getValidSeedsTest())
    finally:
        env.close()
    assert len(train) == len(test) == games.TextWorldExpress().num_episodes("coin", "test")
    assert not train & test


@needs_java
def test_scienceworld_train_and_test_variations_are_disjoint():
    sw = games.ScienceWorld()
    import scienceworld

    env = scienceworld.ScienceWorldEnv("boil")
    try:
        train, test = (set(games._sw_variations(env, "boil", split)) for split in games.SPLITS)
    finally:
        env.close()
    assert train and test and not train & test
    assert (sw.num_episodes("boil", "train"), sw.num_episodes("boil", "test")) == (len(train), len(test))


def test_textworld_splits_use_disjoint_seeds_and_the_cooking_split(tmp_path):
    train = {games.tw_seed("train", e) for e in range(games.TW_EPISODES_PER_SPLIT)}
    test = {games.tw_seed("test", e) for e in range(games.TW_EPISODES_PER_SPLIT)}
    assert not train & test
    command = games.tw_make_command("cooking-level2", "test", 4, tmp_path / "g.z8")
    assert command[command.index("--split") + 1] == "test"
    assert command[command.index("--seed") + 1] == str(games.TW_TEST_SEED_BASE + 4)
    assert "--split" not in games.tw_make_command("coin_collector-level1", "test", 0, tmp_path / "g.z8")


def test_jericho_split_covers_the_tales_games_once_each():
    train, test = games.Jericho().tasks("train"), games.Jericho().tasks("test")
    assert len(train) == len(test) == 27 and not set(train) & set(test)
    assert all(name in games._jericho_roms() for name in train + test)


def test_generated_textworld_game_is_cached_and_reused(tmp_path):
    first = games.ensure_textworld_game("coin_collector-level1", "train", 7, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert games.ensure_textworld_game("coin_collector-level1", "train", 7, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp and first.with_suffix(".json").exists()


@pytest.mark.parametrize(
    ("reply", "action"),
    [
        ("take coin", "take coin"),
        ("  > open the fridge\nbecause it is closed", "open the fridge"),
        ("```\ngo north\n```", "go north"),
        ("'eat meal'", "eat meal"),
        ("", ""),
    ],
)
def test_single_turn_replies_are_read_as_one_command(reply, action):
    assert parse_action(reply) == action


def test_single_turn_row_condenses_the_whole_history_into_one_user_message():
    fields = task_fields("textworld_express", "coin", "train", 2)
    turns = [("look around", "You see a coin."), ("inventory", "You carry nothing.")]
    row = single_turn_row(fields, "Find the coin.\n", turns, expected_command="take coin")
    system, user = row["responses_create_params"]["input"]
    assert system["role"] == "system" and user["role"] == "user"
    assert user["content"] == condensed_transcript("Find the coin.", turns)
    assert user["content"] == (
        "Find the coin.\n\n> look around\nYou see a coin.\n\n> inventory\nYou carry nothing.\n\n>"
    )
    assert row["history"] == ["look around", "inventory"] and row["expected_command"] == "take coin"
    assert row_id(row) == "textworld_express/coin/train/2/single_turn/h2"


def test_textworld_intro_loses_its_logo_and_prompt():
    raw = "\n\n  ____  \n |    | \n $$$$$$ \n\nWelcome to the game!\n\n\n\nA room.\n\n>  -= Room =-0/1"
    assert games.clean_textworld(raw) == "Welcome to the game!\n\nA room."
