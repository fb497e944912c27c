"""The resources server over real HTTP with real games: walkthroughs win, wrong play does not, sessions stay apart."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import needs_java
from episodes import message_item, tool_call_items

COIN = {"framework": "textworld_express", "task": "coin", "split": "test", "episode": 0}
ARITHMETIC = {"framework": "textworld_express", "task": "arithmetic", "split": "train", "episode": 3}
TW_COIN = {"framework": "textworld", "task": "coin_collector-level1", "split": "test", "episode": 0}
TW_COOKING = {"framework": "textworld", "task": "cooking-level1", "split": "train", "episode": 1}
SW_LIVING = {"framework": "scienceworld", "task": "find-living-thing", "split": "test", "episode": 0}

GAMES = [
    pytest.param(COIN, id="twx-coin"),
    pytest.param(ARITHMETIC, id="twx-arithmetic"),
    pytest.param(TW_COIN, id="textworld-coin"),
    pytest.param(TW_COOKING, id="textworld-cooking"),
    pytest.param(SW_LIVING, id="scienceworld-living", marks=needs_java),
]


def play_gold(client) -> tuple[dict, list[str]]:
    start = client.seed()
    gold = client.walkthrough()
    assert gold, "the game has a walkthrough"
    result = start
    for command in gold:
        result = client.command(command)
    return result, gold


@pytest.mark.parametrize("fields", GAMES)
def test_walkthrough_reaches_full_score_through_the_endpoints(client_factory, fields):
    client = client_factory(**fields)
    last, gold = play_gold(client)
    assert last["won"] and last["done"] and last["score"] == last["max_score"] > 0
    verdict = client.verify().json()
    assert verdict["reward"] == 1.0 and verdict["won"] is True
    assert verdict["verified_from"] == "session" and verdict["commands"] == gold
    assert verdict["task_id"] == "/".join(str(fields[k]) for k in ("framework", "task", "split", "episode"))
    assert client.verify().json()["reward"] == 1.0  # a second verify gives the same verdict


@pytest.mark.parametrize("fields", [COIN, TW_COOKING], ids=["twx-coin", "textworld-cooking"])
def test_a_wrong_action_does_not_reach_full_score(client_factory, fields):
    client = client_factory(**fields)
    client.seed()
    result = client.command("dance wildly")
    assert not result["won"] and result["score"] < result["max_score"]
    verdict = client.verify().json()
    assert verdict["reward"] < 1.0 and verdict["won"] is False and verdict["commands"] == ["dance wildly"]


def test_sessions_do_not_leak_into_each_other(client_factory):
    winner, idler = client_factory(**COIN), client_factory(**COIN)
    other_game = client_factory(**ARITHMETIC)
    for client in (winner, idler, other_game):
        client.seed()
    gold = winner.walkthrough()
    assert gold != other_game.walkthrough()
    for command in gold:  # interleave: every session moves between the winner's commands
        winner.command(command)
        looked = idler.command("look around")
        assert looked["score"] == 0 and not looked["won"]
        other_game.command("inventory")
    assert winner.verify().json()["reward"] == 1.0
    idle_verdict = idler.verify().json()
    assert idle_verdict["reward"] == 0.0 and idle_verdict["commands"] == ["look around"] * len(gold)
    other = other_game.verify(**{}).json()
    assert other["task_id"].startswith("textworld_express/arithmetic") and other["moves"] == len(gold)


def test_concurrent_sessions_each_win_their_own_game(client_factory):
    clients = [client_factory(**(COIN if i % 2 else ARITHMETIC)) for i in range(4)]
    with ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(play_gold, clients))
        verdicts = list(pool.map(lambda c: c.verify().json(), clients))
    assert all(last["won"] for last, _ in results)
    assert [v["reward"] for v in verdicts] == [1.0] * 4
    assert [v["commands"] for v in verdicts] == [gold for _, gold in results]


def test_unknown_session_gets_a_clear_error(client_factory):
    stranger = client_factory(**COIN)
    for path, body in (("/execute_command", {"command": "look"}), ("/walkthrough", {})):
        response = stranger.post(path, body)
        assert response.status_code == 404
        assert "call /seed_session first" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"command": ""}, "empty command"),
        ({"command": "   "}, "empty command"),
        ({"command": "x" * 201}, "command too long"),
        ({"command": "look\ntake coin"}, "single line"),
        ({}, "command"),
        ({"command": 7}, "command"),
    ],
)
def test_bad_commands_get_clear_errors(client_factory, body, message):
    client = client_factory(**COIN)
    client.seed()
    response = client.post("/execute_command", body)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])
    assert client.command("look around")["moves"] == 1  # the refused commands did not reach the game


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({**COIN, "framework": "zork"}, "unknown framework 'zork'"),
        ({**COIN, "task": "chess"}, "unknown textworld_express task 'chess'"),
        ({**COIN, "episode": 5000}, "episodes 0..999"),
        ({"framework": "jericho", "task": "zork1", "split": "train", "episode": 0}, "in the train split"),
    ],
)
def test_unknown_tasks_are_refused_with_the_choices(client_factory, fields, message):
    response = client_factory(**fields).post("/seed_session", {"responses_create_params": {"input": "x"}, **fields})
    assert response.status_code == 422 and message in response.json()["detail"]


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"framework": "jericho", "task": "zork1"}, ["download", "zork1.z5", "TALES_JERICHO_DIR"]),
        (
            {"framework": "alfworld", "task": "pick_and_place_simple-seen"},
            ["pip install alfworld", "alfworld-download"],
        ),
    ],
)
def test_frameworks_that_need_downloads_say_what_to_get(client_factory, fields, needles):
    response = client_factory(**fields).post("/seed_session", {"responses_create_params": {"input": "x"}, **fields})
    assert response.status_code == 503
    assert all(needle in response.json()["detail"] for needle in needles)


def test_finished_games_and_step_limits_refuse_more_commands(client_factory):
    winner = client_factory(**COIN)
    play_gold(winner)
    over = winner.post("/execute_command", {"command": "look around"})
    assert over.status_code == 409 and "game is over" in over.json()["detail"]

    limited = client_factory(**COIN)
    assert limited.seed(max_steps=1)["steps_left"] == 1
    limited.command("look around")
    refused = limited.post("/execute_command", {"command": "take coin"})
    assert refused.status_code == 409 and "step limit" in refused.json()["detail"]
    assert limited.verify(max_steps=1).json()["reward"] == 0.0


@pytest.mark.parametrize("fields", [COIN, TW_COIN], ids=["twx", "textworld"])
def test_single_turn_rows_are_verified_by_the_game(client_factory, fields):
    scout = client_factory(**fields)
    scout.seed()
    gold = scout.walkthrough()
    history, last = gold[:-1], gold[-1]
    row = {"mode": "single_turn", "history": history}

    right = client_factory(**fields)
    seeded = right.seed(**row)
    assert seeded["moves"] == len(history) and not seeded["won"]
    refused = right.post("/execute_command", {"command": last})
    assert refused.status_code == 409 and "single-turn" in refused.json()["detail"]
    verdict = right.verify([message_item(f"> {last}\n")], **row).json()
    assert verdict["reward"] == 1.0 and verdict["commands"] == [last] and verdict["verified_from"] == "session"

    wrong = client_factory(**fields)
    wrong.seed(**row)
    assert wrong.verify([message_item("dance wildly")], **row).json()["reward"] < 1.0

    unseeded = client_factory(**fields)  # no /seed_session: /verify replays the history in a fresh game
    verdict = unseeded.verify([message_item(last)], **row).json()
    assert verdict["reward"] == 1.0 and verdict["verified_from"] == "replay"


def test_multi_turn_verify_replays_the_response_without_a_session(client_factory):
    scout = client_factory(**ARITHMETIC)
    scout.seed()
    gold = scout.walkthrough()
    output = [item for command in gold for item in tool_call_items(command, "{}")]
    verdict = client_factory(**ARITHMETIC).verify(output).json()
    assert verdict["reward"] == 1.0 and verdict["verified_from"] == "replay" and verdict["commands"] == gold
    wrong = [item for command in ("look around", "dance") for item in tool_call_items(command, "{}")]
    assert client_factory(**ARITHMETIC).verify(wrong).json()["reward"] == 0.0


def test_verify_for_another_task_than_the_session_plays_is_refused(client_factory):
    client = client_factory(**COIN)
    client.seed()
    response = client.verify(task="arithmetic")
    assert response.status_code == 409 and "textworld_express/coin/test/0" in response.json()["detail"]


def test_capacity_and_walkthrough_switch(small_server, client_factory):
    first, second = client_factory(small_server, **COIN), client_factory(small_server, **COIN)
    first.seed()
    full = second.post("/seed_session", second.row())
    assert full.status_code == 503 and "max_active_games=1" in full.json()["detail"]
    hidden = first.post("/walkthrough")
    assert hidden.status_code == 403 and "expose_walkthroughs" in hidden.json()["detail"]
    assert first.post("/close_session").json() == {"closed": True}
    assert second.seed()["task_id"] == "textworld_express/coin/test/0"
