"""TALES text games as a NeMo Gym resources server: one game per session, the agent's tool plays one command.

Endpoints (POST, JSON; the session is NeMo Gym's signed session cookie that /seed_session sets):
- /seed_session   start the row's game for this session (single-turn rows also replay their `history`).
- /execute_command  the agent's tool: {"command": "open door"} -> observation, score, done, ...
- /verify         score the episode with the game's own score: reward = score / max_score in [0, 1].
                  Multi-turn: the session's game (or, without a session, the response's execute_command calls
                  replayed in a fresh game). Single-turn: the response's text is the next command, played after
                  the row's history.
- /walkthrough    the session's gold command sequence, only when the config sets expose_walkthroughs.
- /close_session  end this session's game now (verify also ends it).
- /aggregate_metrics  NeMo Gym's reward statistics over verify responses.

Run it under NeMo Gym (`ng_run "+config_paths=[.../configs/nemo_gym_tales.yaml, ...]"`, which starts `python app.py`)
or on its own: `python app.py --host 127.0.0.1 --port 8000 [--config configs/nemo_gym_tales.yaml]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from games import FrameworkUnavailable, Game, GameState, UnknownTask, open_game, task_id
from nemo_gym.base_resources_server import (
    BaseResourcesServerConfig,
    BaseSeedSessionRequest,
    BaseSeedSessionResponse,
    BaseVerifyRequest,
    BaseVerifyResponse,
    SimpleResourcesServer,
)
from nemo_gym.server_utils import SESSION_ID_KEY
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "nemo_gym_tales.yaml"
SERVER_KEY = "nemo_gym_tales"  # this server's key under resources_servers in the config YAML
TOOL_NAME = "execute_command"
Mode = Literal["multi_turn", "single_turn"]


class TalesResourcesServerConfig(BaseResourcesServerConfig):
    max_steps: int = Field(100, ge=1, description="commands per episode unless the row sets max_steps")
    max_active_games: int = Field(32, ge=1, description="running games at once; /seed_session answers 503 beyond")
    idle_timeout_s: float = Field(1800.0, gt=0, description="a game idle this long is closed")
    max_command_chars: int = Field(200, ge=1, description="longer commands are refused (Jericho truncates at 198)")
    game_threads: int = Field(32, ge=1, description="threads that run the blocking game calls")
    expose_walkthroughs: bool = Field(False, description="serve /walkthrough (gold commands): data generation only")


class TaskFields(BaseModel):
    """The dataset row's task: which game, which formulation."""

    framework: str = Field(description="textworld_express | textworld | scienceworld | jericho | alfworld")
    task: str
    split: Literal["train", "test"] = "test"
    episode: int = Field(0, ge=0, description="which game of the split (a seed, a variation, a generated game)")
    mode: Mode = "multi_turn"
    history: list[str] = Field(default_factory=list, description="single-turn: commands already played")
    max_steps: int | None = Field(None, ge=1)

    @property
    def task_id(self) -> str:
        return task_id(self.framework, self.task, self.split, self.episode)


class TalesSeedSessionRequest(BaseSeedSessionRequest, TaskFields):
    model_config = ConfigDict(extra="allow")


class GameView(BaseModel):
    observation: str
    score: float
    max_score: float
    moves: int
    won: bool
    lost: bool
    done: bool
    steps_left: int


class TalesSeedSessionResponse(BaseSeedSessionResponse, GameView):
    task_id: str
    mode: Mode


class ExecuteCommandRequest(BaseModel):
    command: str = Field(description="one text command for the game, e.g. 'open the fridge'")


class ExecuteCommandResponse(GameView):
    pass


class WalkthroughResponse(BaseModel):
    task_id: str
    walkthrough: list[str]


class CloseSessionResponse(BaseModel):
    closed: bool


class TalesVerifyRequest(BaseVerifyRequest, TaskFields):
    model_config = ConfigDict(extra="allow")


class TalesVerifyResponse(BaseVerifyResponse):
    model_config = ConfigDict(extra="allow")
    task_id: str
    score: float
    max_score: float
    won: bool
    lost: bool
    moves: int
    commands: list[str] = Field(description="the commands this verdict scored (single-turn: the one next command)")
    verified_from: Literal["session", "replay"]


@dataclass
class Session:
    fields: TaskFields
    game: Game | None
    state: GameState
    max_steps: int
    steps: int = 0
    commands: list[str] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    verdict: dict[str, Any] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def view(self) -> dict[str, Any]:
        return self.state.model_dump() | {"steps_left": max(0, self.max_steps - self.steps)}


def parse_action(text: str) -> str:
    """The next command from a single-turn reply: first non-empty line, without a '>' prompt, quotes or fences."""
    for line in text.replace("```", "\n").splitlines():
        line = line.strip().lstrip(">").strip().strip("`'\"").strip()
        if line:
            return line
    return ""


def response_text(response: Any) -> str:
    """The assistant text of a NeMo Gym (Responses API) response."""
    parts = []
    for item in response.output:
        if getattr(item, "type", None) == "message" and getattr(item, "role", None) == "assistant":
            parts += [getattr(c, "text", "") or "" for c in item.content if getattr(c, "type", "") == "output_text"]
    return "\n".join(parts)


def response_commands(response: Any) -> list[str]:
    """The `command` arguments of the response's execute_command calls, in order (unparsable calls skipped)."""
    commands = []
    for item in response.output:
        if getattr(item, "type", None) == "function_call" and getattr(item, "name", None) == TOOL_NAME:
            try:
                command = json.loads(item.arguments).get("command")
            except (ValueError, AttributeError):
                continue
            if isinstance(command, str):
                commands.append(command)
    return commands


class TalesResourcesServer(SimpleResourcesServer):
    config: TalesResourcesServerConfig
    _sessions: dict[str, Session] = PrivateAttr(default_factory=dict)
    _executor: ThreadPoolExecutor | None = PrivateAttr(default=None)

    def setup_webserver(self) -> FastAPI:
        app = super().setup_webserver()
        app.post(f"/{TOOL_NAME}")(self.execute_command)
        app.post("/walkthrough")(self.walkthrough)
        app.post("/close_session")(self.close_session)
        return app

    # -- helpers ------------------------------------------------------------------------------------------------------

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.config.game_threads, thread_name_prefix="tales-game")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _open(self, fields: TaskFields) -> tuple[Game, GameState]:
        try:
            return await self._blocking(open_game, fields.framework, fields.task, fields.split, fields.episode)
        except UnknownTask as err:
            raise HTTPException(422, str(err)) from err
        except FrameworkUnavailable as err:
            raise HTTPException(503, str(err)) from err

    async def _close_game(self, session: Session) -> None:
        game, session.game = session.game, None
        if game is not None:
            await self._blocking(game.close)

    async def _reap_idle(self) -> None:
        deadline = time.monotonic() - self.config.idle_timeout_s
        for session in list(self._sessions.values()):
            if session.game is not None and session.last_used < deadline and not session.lock.locked():
                await self._close_game(session)

    def _session(self, request: Request) -> tuple[str, Session]:
        session_id = request.session[SESSION_ID_KEY]
        session = self._sessions.get(session_id)
        if session is None:
            raise HTTPException(
                404,
                "unknown session: no game was started for it; call /seed_session first and send the session cookie "
                f"it sets ({self.get_session_middleware_key()}) with every later call",
            )
        session.last_used = time.monotonic()
        return session_id, session

    def _validate_command(self, command: str) -> str:
        command = command.strip()
        if not command:
            raise HTTPException(422, 'empty command: send one text command, e.g. {"command": "look"}')
        if len(command) > self.config.max_command_chars:
            raise HTTPException(
                422, f"command too long ({len(command)} characters, at most {self.config.max_command_chars})"
            )
        if "\n" in command:
            raise HTTPException(422, "one command per call: the command must be a single line")
        return command

    async def _play(self, game: Game, state: GameState, commands: list[str]) -> GameState:
        for command in commands:
            if state.done:
                break
            state = await self._blocking(game.step, command)
        return state

    # -- endpoints ----------------------------------------------------------------------------------------------------

    async def seed_session(self, request: Request, body: TalesSeedSessionRequest) -> TalesSeedSessionResponse:
        session_id = request.session[SESSION_ID_KEY]
        fields = TaskFields.model_validate(body.model_dump(include=set(TaskFields.model_fields)))
        previous = self._sessions.pop(session_id, None)
        if previous is not None:
            await self._close_game(previous)
        await self._reap_idle()
        active = sum(s.game is not None for s in self._sessions.values())
        if active >= self.config.max_active_games:
            raise HTTPException(
                503,
                f"server at capacity: {active} games running (max_active_games={self.config.max_active_games}); "
                "verify or /close_session finished episodes, or raise max_active_games",
            )
        game, state = await self._open(fields)
        max_steps = fields.max_steps or self.config.max_steps
        session = Session(fields=fields, game=game, state=state, max_steps=max_steps)
        self._sessions[session_id] = session
        if fields.mode == "single_turn" and fields.history:
            async with session.lock:
                session.state = await self._play(game, state, fields.history)
                session.steps = len(fields.history)
        return TalesSeedSessionResponse(task_id=fields.task_id, mode=fields.mode, **session.view())

    async def execute_command(self, request: Request, body: ExecuteCommandRequest) -> ExecuteCommandResponse:
        _, session = self._session(request)
        command = self._validate_command(body.command)
        async with session.lock:
            if session.game is None:
                raise HTTPException(409, "this episode is over (verified or closed): call /seed_session to play again")
            if session.fields.mode == "single_turn":
                raise HTTPException(409, "single-turn episode: the model's reply is the next command, sent to /verify")
            if session.state.done:
                raise HTTPException(409, "the game is over (won or lost): call /verify to score it")
            if session.steps >= session.max_steps:
                raise HTTPException(409, f"step limit reached ({session.max_steps} commands): call /verify to score it")
            session.state = await self._blocking(session.game.step, command)
            session.steps += 1
            session.commands.append(command)
            return ExecuteCommandResponse(**session.view())

    async def walkthrough(self, request: Request) -> WalkthroughResponse:
        if not self.config.expose_walkthroughs:
            raise HTTPException(403, "walkthroughs are not served: set expose_walkthroughs: true in the server config")
        _, session = self._session(request)
        if session.game is None:
            raise HTTPException(409, "this episode is over (verified or closed): call /seed_session first")
        return WalkthroughResponse(task_id=session.fields.task_id, walkthrough=list(session.game.walkthrough))

    async def close_session(self, request: Request) -> CloseSessionResponse:
        session = self._sessions.pop(request.session[SESSION_ID_KEY], None)
        if session is not None:
            async with session.lock:
                await self._close_game(session)
        return CloseSessionResponse(closed=session is not None)

    async def verify(self, request: Request, body: TalesVerifyRequest) -> TalesVerifyResponse:
        fields = TaskFields.model_validate(body.model_dump(include=set(TaskFields.model_fields)))
        session = self._sessions.get(request.session[SESSION_ID_KEY])
        if session is not None and session.fields.task_id != fields.task_id:
            raise HTTPException(
                409, f"this session plays {session.fields.task_id}, but the verify request is for {fields.task_id}"
            )
        if session is not None and session.verdict is not None:
            verdict = session.verdict
        elif fields.mode == "single_turn":
            verdict = await self._verify_single_turn(fields, body, session)
        elif session is not None:
            async with session.lock:
                await self._close_game(session)
            verdict = self._verdict(fields, session.state, session.commands, "session")
            session.verdict = verdict
        else:
            verdict = await self._replay(fields, response_commands(body.response))
        return TalesVerifyResponse(**body.model_dump(), **verdict)

    async def _verify_single_turn(
        self, fields: TaskFields, body: TalesVerifyRequest, session: Session | None
    ) -> dict[str, Any]:
        action = parse_action(response_text(body.response))
        commands = [action] if action else []
        if session is None:
            return await self._replay(fields, [*fields.history, *commands], scored=commands)
        async with session.lock:
            if session.game is not None:
                session.state = await self._play(session.game, session.state, commands)
                await self._close_game(session)
            session.verdict = self._verdict(fields, session.state, commands, "session")
        return session.verdict

    async def _replay(self, fields: TaskFields, commands: list[str], scored: list[str] | None = None) -> dict[str, Any]:
        limit = fields.max_steps or self.config.max_steps
        max_steps = len(fields.history) + 1 if fields.mode == "single_turn" else limit
        game, state = await self._open(fields)
        try:
            state = await self._play(game, state, commands[:max_steps])
        finally:
            await self._blocking(game.close)
        return self._verdict(fields, state, commands if scored is None else scored, "replay")

    @staticmethod
    def _verdict(fields: TaskFields, state: GameState, commands: list[str], source: str) -> dict[str, Any]:
        return {
            "reward": state.reward,
            "task_id": fields.task_id,
            "score": state.score,
            "max_score": state.max_score,
            "won": state.won,
            "lost": state.lost,
            "moves": state.moves,
            "commands": commands,
            "verified_from": source,
        }


# -- running it on its own -----------------------------------------------------------------------------------------


def load_config(path: Path, host: str, port: int, **overrides: Any) -> TalesResourcesServerConfig:
    """This server's section of a NeMo Gym config YAML, with host/port (and any overrides) set."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for top_name, top in raw.items():
        section = (top or {}).get("resources_servers", {}).get(SERVER_KEY)
        if section is not None:
            known = set(TalesResourcesServerConfig.model_fields)
            values = {k: v for k, v in section.items() if k in known}
            return TalesResourcesServerConfig(**(values | {"name": top_name, "host": host, "port": port} | overrides))
    raise SystemExit(f"app.py: {path} has no resources_servers.{SERVER_KEY} section")


def build_app(config: TalesResourcesServerConfig) -> FastAPI:
    from nemo_gym.config_types import BaseServerConfig
    from nemo_gym.server_utils import ServerClient
    from omegaconf import OmegaConf

    # No head server when running alone: this server never calls other servers.
    head = BaseServerConfig(host=config.host, port=0)
    client = ServerClient(head_server_config=head, global_config_dict=OmegaConf.create({}))
    server = TalesResourcesServer(config=config, server_client=client)
    app = server.setup_webserver()
    server.setup_liveness(app)
    server.setup_exception_middleware(app)
    return app


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Serve the TALES resources server without NeMo Gym's launcher.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--expose-walkthroughs", action="store_true", help="serve /walkthrough (data generation)")
    parser.add_argument("--max-active-games", type=int, default=None)
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.expose_walkthroughs:
        overrides["expose_walkthroughs"] = True
    if args.max_active_games is not None:
        overrides["max_active_games"] = args.max_active_games
    config = load_config(args.config, args.host, args.port, **overrides)

    import uvicorn

    uvicorn.run(build_app(config), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1:])
    else:  # started by NeMo Gym's launcher, which passes its config through the environment
        TalesResourcesServer.run_webserver()
