"""TALES text-game frameworks behind one small interface, with their train/test task split (tt_split).

A task is (framework, task, split, episode): `episode` picks one game of the split (a TextWorld-Express seed, a
ScienceWorld variation, a TextWorld game generated offline by tw-make; Jericho has one game per task). Every game
reports the framework's own score; `GameState.reward` is that score over the game's maximum, clipped to [0, 1].

Frameworks, and what they need here:
- textworld_express: the `textworld-express` package and Java (runs offline).
- textworld: the `textworld` package; games are generated on first use by `tw-make` into a cache folder (offline).
- scienceworld: the `scienceworld` package and Java (runs offline).
- jericho: the `jericho` package plus the TALES Jericho story files, a download (see README).
- alfworld: the `alfworld` package plus its game data, a download; not played by this server.
Anything missing raises FrameworkUnavailable naming what to install or download.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
TEXTWORLD_DIR_ENV = "TALES_TEXTWORLD_DIR"
JERICHO_DIR_ENV = "TALES_JERICHO_DIR"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemo_gym_tales"


class FrameworkUnavailable(RuntimeError):
    """The framework cannot run here; the message names what to install or download."""


class UnknownTask(ValueError):
    """The task does not exist in that framework or split; the message lists the valid choices."""


class GameState(BaseModel):
    observation: str
    score: float
    max_score: float
    moves: int
    won: bool
    lost: bool
    done: bool

    @property
    def reward(self) -> float:
        if self.max_score <= 0:
            return float(self.won)
        return min(1.0, max(0.0, self.score / self.max_score))


class Game(ABC):
    """One running game; not thread-safe (the server runs one command at a time per session)."""

    walkthrough: list[str]

    @abstractmethod
    def reset(self) -> GameState: ...

    @abstractmethod
    def step(self, command: str) -> GameState: ...

    @abstractmethod
    def close(self) -> None: ...


class Framework(ABC):
    name: ClassVar[str]

    @abstractmethod
    def check(self) -> None:
        """Raise FrameworkUnavailable when this framework cannot run here."""

    @abstractmethod
    def tasks(self, split: str) -> list[str]: ...

    @abstractmethod
    def num_episodes(self, task: str, split: str) -> int:
        """How many distinct games the split holds for that task."""

    @abstractmethod
    def open(self, task: str, split: str, episode: int) -> Game: ...

    def validate(self, task: str, split: str, episode: int) -> None:
        if split not in SPLITS:
            raise UnknownTask(f"unknown split {split!r}: use one of {list(SPLITS)}")
        tasks = self.tasks(split)
        if task not in tasks:
            raise UnknownTask(f"unknown {self.name} task {task!r} in the {split} split: use one of {tasks}")
        count = self.num_episodes(task, split)
        if not 0 <= episode < count:
            raise UnknownTask(
                f"{self.name} task {task!r} has episodes 0..{count - 1} in the {split} split, not {episode}"
            )


def _require_java(framework: str) -> None:
    if shutil.which("java") is None:
        raise FrameworkUnavailable(
            f"{framework} needs Java on PATH: install a JRE (e.g. `apt-get install default-jre`) and restart the server"
        )


def _require_module(module: str, package: str, framework: str) -> None:
    try:
        __import__(module)
    except ImportError as err:
        raise FrameworkUnavailable(
            f"{framework} needs the `{package}` package: pip install -r integrations/nemo_gym_tales/requirements.txt "
            f"({err})"
        ) from err


# ---------------------------------------------------------------------------------------------------------------------
# TextWorld-Express: seeds of the game's own train and test folds.

# (task name, game name, game parameters): the TALES selection of TextWorld-Express games.
TWX_TASKS: dict[str, tuple[str, str]] = {
    "cookingworld": (
        "cookingworld",
        "numLocations=1,numIngredients=2,numDistractorItems=5,includeDoors=0,limitInventorySize=0",
    ),
    "twc": ("twc", "numLocations=1,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0"),
    "coin": ("coin", "numLocations=1,numDistractorItems=5,limitInventorySize=0"),
    "arithmetic": ("arithmetic", ""),
    "mapreader": (
        "mapreader",
        "numLocations=2,maxDistanceApart=1,maxDistractorItemsPerLocation=2,includeDoors=0,limitInventorySize=0",
    ),
    "sorting": ("sorting", ""),
    "simonsays10": ("simonsays", "gameLength=10,numDistractors=4,memorization=0"),
    "simonsays10-memory": ("simonsays", "gameLength=10,numDistractors=4,memorization=1,verbose=0"),
    "peckingorder": ("peckingorder", ""),
}


class TwxGame(Game):
    def __init__(self, task: str, split: str, episode: int) -> None:
        import textworld_express as twx

        self.game_name, self.params = TWX_TASKS[task]
        self.split = split
        self.env = twx.TextWorldExpressEnv(envStepLimit=10**9)
        seeds = self.env.getValidSeedsTrain() if split == "train" else self.env.getValidSeedsTest()
        self.seed = seeds[episode]
        self.walkthrough = []

    def _state(self, obs: str, info: dict, done: bool) -> GameState:
        return GameState(
            observation=obs,
            score=round(float(info["score"]) * 100, 6),
            max_score=100.0,
            moves=int(info["numMoves"]),
            won=bool(info["tasksuccess"]),
            lost=bool(info["taskfailure"]),
            done=bool(done),
        )

    def reset(self) -> GameState:
        obs, info = self.env.reset(
            seed=self.seed, gameFold=self.split, gameName=self.game_name, gameParams=self.params, generateGoldPath=True
        )
        self.walkthrough = list(self.env.getGoldActionSequence())
        return self._state(f"{info['taskDescription']}\n\n{obs}", info, False)

    def step(self, command: str) -> GameState:
        obs, _reward, done, info = self.env.step(command)
        return self._state(obs, info, done)

    def close(self) -> None:
        self.env.close()


class TextWorldExpress(Framework):
    name = "textworld_express"

    def check(self) -> None:
        _require_module("textworld_express", "textworld-express", self.name)
        _require_java(self.name)

    def tasks(self, split: str) -> list[str]:
        return list(TWX_TASKS)

    def num_episodes(self, task: str, split: str) -> int:
        return 1000  # getValidSeedsTrain() / getValidSeedsTest() each hold 1000 seeds (disjoint ranges)

    def open(self, task: str, split: str, episode: int) -> Game:
        return TwxGame(task, split, episode)


# ---------------------------------------------------------------------------------------------------------------------
# ScienceWorld: variations of the simulator's own train and test sets.


class ScienceWorldGame(Game):
    def __init__(self, task: str, split: str, episode: int) -> None:
        import scienceworld

        self.task = task
        self.env = scienceworld.ScienceWorldEnv(task, envStepLimit=10**9)
        self.variation = _sw_variations(self.env, task, split)[episode]
        self.walkthrough = []

    def _state(self, obs: str, info: dict, done: bool) -> GameState:
        score = float(info["score"])
        return GameState(
            observation=obs,
            score=score,
            max_score=100.0,
            moves=int(info["moves"]),
            won=score >= 100,
            lost=score < 0,
            done=bool(done),
        )

    def reset(self) -> GameState:
        self.env.load(self.task, self.variation, "", generateGoldPath=True)
        obs, info = self.env.reset()
        self.walkthrough = list(self.env.get_gold_action_sequence())
        return self._state(f"{info['taskDesc']}\n\n{obs}", info, False)

    def step(self, command: str) -> GameState:
        obs, _reward, done, info = self.env.step(command)
        return self._state(obs, info, done)

    def close(self) -> None:
        self.env.close()


def _sw_variations(env, task: str, split: str) -> list[int]:
    env.load(task, 0, "")
    return list(env.get_variations_train() if split == "train" else env.get_variations_test())


class ScienceWorld(Framework):
    name = "scienceworld"
    _counts: ClassVar[dict[tuple[str, str], int]] = {}
    _counts_lock = threading.Lock()

    def check(self) -> None:
        _require_module("scienceworld", "scienceworld", self.name)
        _require_java(self.name)

    def tasks(self, split: str) -> list[str]:
        from scienceworld.constants import ID2TASK

        return list(ID2TASK.values())

    def num_episodes(self, task: str, split: str) -> int:
        # Asking the simulator costs a JVM start (~2 s): once per (task, split) per process.
        with self._counts_lock:
            if (task, split) not in self._counts:
                import scienceworld

                env = scienceworld.ScienceWorldEnv(task)
                try:
                    for each in SPLITS:
                        self._counts[(task, each)] = len(_sw_variations(env, task, each))
                finally:
                    env.close()
            return self._counts[(task, split)]

    def open(self, task: str, split: str, episode: int) -> Game:
        return ScienceWorldGame(task, split, episode)


# ---------------------------------------------------------------------------------------------------------------------
# TextWorld: games generated offline by tw-make; train and test games come from disjoint seed ranges (and, for the
# cooking games, from tw-cooking's own ingredient split).

TW_TEST_SEED_BASE = 1_000_000  # train episode i uses seed i + 1, test episode i uses TW_TEST_SEED_BASE + i
TW_EPISODES_PER_SPLIT = 100_000
TW_TASKS: dict[str, list[str]] = {
    "cooking-level1": ["tw-cooking", "--recipe", "1", "--take", "1", "--go", "1"],
    "cooking-level2": ["tw-cooking", "--recipe", "1", "--take", "1", "--go", "6", "--open"],
    "cooking-level3": ["tw-cooking", "--recipe", "2", "--take", "2", "--go", "6", "--open", "--cook", "--cut"],
    "cooking-level4": ["tw-cooking", "--recipe", "3", "--take", "3", "--go", "9", "--open", "--cook", "--cut"],
    "coin_collector-level1": ["tw-coin_collector", "--level", "1"],
    "coin_collector-level10": ["tw-coin_collector", "--level", "10"],
    "treasure_hunter-level1": ["tw-treasure_hunter", "--level", "1"],
    "treasure_hunter-level10": ["tw-treasure_hunter", "--level", "10"],
    "simple-dense": ["tw-simple", "--rewards", "dense", "--goal", "detailed"],
    "simple-sparse": ["tw-simple", "--rewards", "sparse", "--goal", "brief"],
}


def textworld_games_dir() -> Path:
    return Path(os.environ.get(TEXTWORLD_DIR_ENV) or DEFAULT_CACHE / "textworld")


def tw_seed(split: str, episode: int) -> int:
    return (TW_TEST_SEED_BASE if split == "test" else 1) + episode


def tw_make_command(task: str, split: str, episode: int, output: Path) -> list[str]:
    args = list(TW_TASKS[task])
    if args[0] == "tw-cooking":
        args += ["--split", split]
    tw_make = Path(sys.executable).with_name("tw-make")
    program = str(tw_make) if tw_make.exists() else "tw-make"
    return [program, *args, "--seed", str(tw_seed(split, episode)), "--output", str(output), "--silent", "-f"]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_textworld_game(task: str, split: str, episode: int, games_dir: Path | None = None) -> Path:
    """The game file, generated by tw-make on first use (~7 s); safe across threads and processes."""
    games_dir = games_dir or textworld_games_dir()
    game = games_dir / task / split / f"{task}-{split}-{episode}.z8"
    if game.exists():
        return game
    with _file_lock(game.with_suffix(".lock")):
        if game.exists():
            return game
        with tempfile.TemporaryDirectory(dir=game.parent) as tmp:
            out = Path(tmp) / game.name
            result = subprocess.run(tw_make_command(task, split, episode, out), capture_output=True, text=True)
            if result.returncode != 0 or not out.exists():
                raise RuntimeError(f"tw-make failed for {task} ({split} {episode}): {result.stderr.strip()[-800:]}")
            # The story file last: its presence means the game is complete.
            for sibling in sorted(Path(tmp).iterdir(), key=lambda p: p.suffix == ".z8"):
                os.replace(sibling, game.parent / sibling.name)
    return game


BANNER_CHARS = frozenset(" _$|\\/<>")


def clean_textworld(text: str) -> str:
    """Drop the intro's ~1,500-character ASCII-art logo, the trailing '>' prompt and runs of blank lines."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and set(lines[0]) <= BANNER_CHARS:
        lines.pop(0)
    while lines and (not lines[-1] or lines[-1].startswith(">")):
        lines.pop()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


# TextWorld's logic parser is a module-level global (tatsu) that breaks when two threads load games at once: every
# TextWorld call holds this lock (steps take milliseconds).
TEXTWORLD_LOCK = threading.Lock()


class TextWorldGame(Game):
    def __init__(self, gamefile: Path) -> None:
        import textworld

        infos = textworld.EnvInfos(
            score=True, max_score=True, won=True, lost=True, moves=True, feedback=True, extras=["walkthrough"]
        )
        with TEXTWORLD_LOCK:
            self.env = textworld.start(str(gamefile), infos)
        self.walkthrough = []

    def _state(self, obs: str, info: dict, done: bool) -> GameState:
        return GameState(
            observation=obs,
            score=float(info["score"]),
            max_score=float(info["max_score"]),
            moves=int(info["moves"] or 0),
            won=bool(info["won"]),
            lost=bool(info["lost"]),
            done=bool(done),
        )

    def reset(self) -> GameState:
        with TEXTWORLD_LOCK:
            state = self.env.reset()
        self.walkthrough = list(state["extra.walkthrough"] or [])
        return self._state(clean_textworld(state.feedback), state, False)

    def step(self, command: str) -> GameState:
        with TEXTWORLD_LOCK:
            state, _score, done = self.env.step(command)
        return self._state(clean_textworld(state.feedback), state, done)

    def close(self) -> None:
        with TEXTWORLD_LOCK:
            self.env.close()


class TextWorld(Framework):
    name = "textworld"

    def check(self) -> None:
        _require_module("textworld", "textworld", self.name)

    def tasks(self, split: str) -> list[str]:
        return list(TW_TASKS)

    def num_episodes(self, task: str, split: str) -> int:
        return TW_EPISODES_PER_SPLIT

    def open(self, task: str, split: str, episode: int) -> Game:
        return TextWorldGame(ensure_textworld_game(task, split, episode))


# ---------------------------------------------------------------------------------------------------------------------
# Jericho: the TALES selection of Jericho-supported games; its train split below, every other game is test.

JERICHO_TRAIN = (
    "loose karn ballyhoo zork2 adventureland omniquest weapon 905 wishbringer night tryst205 zork3 murdac afflicted "
    "moonlit dragon reverb jewel enter snacktime enchanter acorncourt huntdark gold yomomma inhumane zenon"
).split()
JERICHO_TEST = (
    "advent anchor awaken balances curses cutthroat deephome detective hhgg infidel library lostpig ludicorp lurking "
    "partyfoul pentari planetfall plundered seastalker sherlock sorcerer spellbrkr spirit temple trinity zork1 ztuu"
).split()
JERICHO_STORIES_HINT = (
    "the Jericho game suite (story files such as zork1.z5) is a download: fetch it (the `jericho-game-suite` folder "
    "of the BYU-PCCL/z-machine-games repository, or TALES' own download) into {dir}, or point {env} at such a folder"
)


def jericho_games_dir() -> Path:
    return Path(os.environ.get(JERICHO_DIR_ENV) or DEFAULT_CACHE / "jericho")


@cache
def _jericho_roms() -> dict[str, str]:
    import jericho.game_info as info

    roms = {}
    for value in vars(info).values():
        if isinstance(value, dict) and "name" in value and "rom" in value:
            roms[value["name"]] = value["rom"]
    return roms


class JerichoGame(Game):
    def __init__(self, story: Path) -> None:
        import jericho

        self.env = jericho.FrotzEnv(str(story))
        self.walkthrough = list(self.env.get_walkthrough())
        self.max_score = float(self.env.get_max_score())

    def _state(self, obs: str, info: dict, done: bool) -> GameState:
        return GameState(
            observation=obs,
            score=float(info["score"]),
            max_score=self.max_score,
            moves=int(info["moves"]),
            won=bool(self.env.victory()),
            lost=bool(self.env.game_over()),
            done=bool(done),
        )

    def reset(self) -> GameState:
        obs, info = self.env.reset()
        return self._state(obs, info, False)

    def step(self, command: str) -> GameState:
        obs, _reward, done, info = self.env.step(command)
        return self._state(obs, info, done)

    def close(self) -> None:
        self.env.close()


class Jericho(Framework):
    name = "jericho"

    def check(self) -> None:
        _require_module("jericho", "jericho", self.name)

    def tasks(self, split: str) -> list[str]:
        return list(JERICHO_TRAIN if split == "train" else JERICHO_TEST)

    def num_episodes(self, task: str, split: str) -> int:
        return 1

    def story_file(self, task: str) -> Path:
        rom = _jericho_roms().get(task, f"{task}.z5")
        story = jericho_games_dir() / rom
        if not story.exists():
            raise FrameworkUnavailable(
                f"jericho game {task!r} needs its story file {story}: "
                + JERICHO_STORIES_HINT.format(dir=jericho_games_dir(), env=JERICHO_DIR_ENV)
            )
        return story

    def open(self, task: str, split: str, episode: int) -> Game:
        return JerichoGame(self.story_file(task))


# ---------------------------------------------------------------------------------------------------------------------
# ALFWorld: its games are a download, and its PDDL games need textworld[pddl]; reported, not played.

ALFWORLD_TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)


class ALFWorld(Framework):
    name = "alfworld"

    def check(self) -> None:
        try:
            import alfworld  # noqa: F401
        except ImportError as err:
            raise FrameworkUnavailable(
                "alfworld needs the `alfworld` package (pip install alfworld==0.4.2 textworld[pddl]) and its game "
                "data, a download (`alfworld-download`, into $ALFWORLD_DATA); this server does not play ALFWorld games"
            ) from err
        raise FrameworkUnavailable(
            "alfworld is installed, but this server does not play ALFWorld games: they need ALFWorld's data download "
            "(`alfworld-download`) and its PDDL wrappers, which this offline build does not exercise"
        )

    def tasks(self, split: str) -> list[str]:
        return [f"{kind}-{where}" for where in ("seen", "unseen") for kind in ALFWORLD_TASK_TYPES]

    def num_episodes(self, task: str, split: str) -> int:
        return 1

    def open(self, task: str, split: str, episode: int) -> Game:
        self.check()  # always raises: see check()
        raise FrameworkUnavailable("alfworld games are not played by this server")


FRAMEWORKS: dict[str, Framework] = {
    framework.name: framework for framework in (TextWorldExpress(), TextWorld(), ScienceWorld(), Jericho(), ALFWorld())
}


def get_framework(name: str) -> Framework:
    try:
        return FRAMEWORKS[name]
    except KeyError:
        raise UnknownTask(f"unknown framework {name!r}: use one of {list(FRAMEWORKS)}") from None


def open_game(framework: str, task: str, split: str, episode: int) -> tuple[Game, GameState]:
    """Check, validate, open and reset a game (blocking: seconds for a JVM start or a tw-make run)."""
    fw = get_framework(framework)
    fw.check()
    fw.validate(task, split, episode)
    game = fw.open(task, split, episode)
    try:
        return game, game.reset()
    except BaseException:
        game.close()
        raise


def task_id(framework: str, task: str, split: str, episode: int) -> str:
    return f"{framework}/{task}/{split}/{episode}"
