"""Classic-control trajectories: one episode of a scripted, noisy controller per record.

`cartpole`, `acrobot` and `pendulum` run gymnasium's CartPole-v1, Acrobot-v1 and Pendulum-v1 with
hand-written controllers that are good but not perfect (ε-random or Gaussian action noise), so the
data has the spread of real behaviour data and is made offline, in milliseconds, from nothing.

Each record is a Gato-style trajectory (see `mmtool.data.schema`): `observation [T, obs_dim]` and
`action [T, 1]` with the same T, plus `reward [T]`. Timestep t holds the observation the controller
saw, the action it took, and the reward that action earned; the observation after the last step is
dropped. Observations are the environment's raw values (the mu-law tokenizer compands them itself).

Long episodes can be cut into windows of whole timesteps (`--opt window=T`, Gato's way): record
k of an episode is its timesteps `[k·T, (k+1)·T)` (the last may be shorter), with id
`...-epI-wKK`. Windows are made here, in the source, rather than in the tokenizer or the loader:
the schema, the token index and every batching strategy keep "one record = one sample", a window
is an ordinary trajectory record (whole timesteps by construction), and the split is the
*episode's* (a hash of the episode id), so the windows of one episode never straddle
train/validation/test. The cost: re-preprocessing to change T. Finding how many windows an
episode has means running it, so `window` runs every episode once when the source is built
(milliseconds each).

Reproducibility: episode i resets the environment with seed `seed + i` and draws the controller's
noise from `numpy.random.default_rng(seed + i)`, and each `read` makes a fresh environment, so
`read(i)` is the same in any process, whatever was read before. (Consequently `seed=0` episode 1 is
`seed=1` episode 0: use seeds far apart, e.g. 0 and 10_000, for disjoint sets.)
"""

from __future__ import annotations

import dataclasses
import math
from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np

from mmtool.data.schema import Field, Record, assign_split
from mmtool.data.sources.base import SOURCES, Source
from mmtool.errors import MMToolError


def _opt(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class EpisodeOptions:
    """Options every control source has."""

    episodes: int = _opt(100, "number of episodes (records)")
    seed: int = _opt(0, "episode i uses seed seed+i for the environment reset and the controller noise")
    max_steps: int = _opt(200, "cap on the episode length T (steps; the episode may end earlier)")
    window: int = _opt(0, "cut each episode into records of this many whole timesteps (ids ...-wKK; "
                          "the last window may be shorter); 0: one record per episode")


@dataclasses.dataclass
class DiscreteControlOptions(EpisodeOptions):
    """Options of the discrete-action control sources (`cartpole`, `acrobot`)."""

    epsilon: float = _opt(0.1, "probability of a uniformly random action at each step (1 = random policy)")


@dataclasses.dataclass
class ContinuousControlOptions(EpisodeOptions):
    """Options of the continuous-action control sources (`pendulum`)."""

    noise: float = _opt(0.1, "std of Gaussian noise added to the controller's torque (N·m) before clipping")


class ControlSource(Source):
    """One episode of a scripted controller per record; subclasses give the env and the controller."""

    env_id: ClassVar[str]
    """The gymnasium environment id, e.g. "CartPole-v1"."""

    Options = EpisodeOptions

    def __init__(self, options: Any, split: str = "all"):
        super().__init__(options, split)
        o = options
        if o.episodes < 1:
            raise MMToolError(f"--opt episodes={o.episodes}: {self.name} needs at least 1 episode")
        if o.max_steps < 1:
            raise MMToolError(f"--opt max_steps={o.max_steps}: {self.name} needs at least 1 step")
        if o.window < 0:
            raise MMToolError(f"--opt window={o.window}: expected timesteps per record ≥ 1 (0: whole episodes)")
        self._windows: list[tuple[int, int]] | None = None  # (episode, first step) per record
        self._last: tuple[int, Record] | None = None  # the last episode run (windows reuse it)

    @abstractmethod
    def act(self, obs: np.ndarray, rng: np.random.Generator) -> Any:
        """The noisy controller: the action for observation `obs`, noise drawn from `rng` only."""

    @abstractmethod
    def action_field(self, actions: list) -> Field:
        """The record's action field built from the episode's actions."""

    def windows(self) -> list[tuple[int, int]]:
        """(episode, first timestep) of every record when `window` is set (runs each episode once)."""
        if self._windows is None:
            w = self.options.window
            self._windows = [(e, t) for e in range(self.options.episodes)
                             for t in range(0, self._episode(e).meta["length"], w)]
        return self._windows

    def __len__(self) -> int:
        return len(self.windows()) if self.options.window else self.options.episodes

    def content_version(self) -> str:
        # Episodes follow from the options and seed, and from gymnasium's environments.
        from importlib.metadata import PackageNotFoundError, version
        try:
            gym = version("gymnasium")
        except PackageNotFoundError:
            gym = "none"
        return f"{self.name}:{self.data_version}:gymnasium-{gym}"

    def episode_id(self, episode: int) -> str:
        return f"{self.name}-s{self.options.seed}-ep{episode}"

    def record_id(self, index: int) -> str:
        if not self.options.window:
            return self.episode_id(index)
        episode, start = self.windows()[index]
        return f"{self.episode_id(episode)}-w{start // self.options.window:02d}"

    def split_of(self, index: int) -> str:
        """The episode's split (a hash of the episode id), shared by all its windows."""
        episode = self.windows()[index][0] if self.options.window else index
        return assign_split(self.name, self.episode_id(episode))

    def location(self, index: int) -> str:
        episode = self.windows()[index][0] if self.options.window else index
        where = f" window {self.record_id(index).rsplit('-w', 1)[1]}" if self.options.window else ""
        return f"{self.name} episode {episode}{where} ({self.env_id}, seed {self.options.seed + episode})"

    def read(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: record {index} out of range 0..{len(self) - 1}")
        if not self.options.window:
            return self._episode(index)
        episode, start = self.windows()[index]
        whole = self._episode(episode)
        end = start + self.options.window
        fields = [dataclasses.replace(f, data=f.data[start:end]) for f in whole.fields]  # [≤ window, ...]
        return Record(id=self.record_id(index), task=whole.task, fields=fields,
                      meta={**whole.meta, "episode": whole.id, "window_start": start,
                            "window_steps": len(fields[0].data)})

    def _episode(self, index: int) -> Record:
        """Runs episode `index` (the last one is cached: consecutive windows share it)."""
        if self._last is None or self._last[0] != index:
            self._last = (index, self._run(index))
        return self._last[1]

    def _run(self, index: int) -> Record:
        import gymnasium as gym  # imported on first read only: listing sources stays cheap

        seed = self.options.seed + index
        env = gym.make(self.env_id, max_episode_steps=self.options.max_steps, disable_env_checker=True)
        rng = np.random.default_rng(seed)
        obs, _ = env.reset(seed=seed)
        observations, actions, rewards = [], [], []
        terminated = truncated = False
        while not (terminated or truncated):
            action = self.act(obs, rng)
            observations.append(obs)
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(float(reward))
        env.close()
        rewards_arr = np.asarray(rewards, np.float32)  # [T]
        return Record(
            id=self.episode_id(index),
            task=f"control/{self.name}",
            fields=[
                Field("observation", "observation", np.asarray(observations, np.float32)),  # [T, obs_dim]
                self.action_field(actions),  # [T, 1]
                Field("reward", "reward", rewards_arr),
            ],
            meta={"episode_return": float(rewards_arr.sum(dtype=np.float64)), "length": len(rewards),
                  "env": self.env_id, "terminated": bool(terminated), "seed": seed},
        )


class DiscreteControlSource(ControlSource):
    """A control source with `num_actions` discrete actions and ε-random exploration."""

    num_actions: ClassVar[int]
    Options = DiscreteControlOptions

    def __init__(self, options: Any, split: str = "all"):
        super().__init__(options, split)
        if not 0.0 <= options.epsilon <= 1.0:
            raise MMToolError(f"--opt epsilon={options.epsilon}: expected a probability in [0, 1]")

    @abstractmethod
    def greedy(self, obs: np.ndarray) -> int:
        """The noiseless controller's action."""

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> int:
        # Both draws happen every step, so the noise stream does not depend on the observations.
        explore = rng.random() < self.options.epsilon
        random_action = int(rng.integers(self.num_actions))
        return random_action if explore else self.greedy(obs)

    def action_field(self, actions: list) -> Field:
        return Field("action", "action", np.asarray(actions, np.int64).reshape(-1, 1),  # [T, 1]
                     tokenizer="discrete", options={"num_classes": self.num_actions})


@SOURCES.register("cartpole")
class CartPoleSource(DiscreteControlSource):
    """CartPole-v1 episodes of a linear state-feedback controller with ε-random actions."""

    env_id = "CartPole-v1"
    num_actions = 2
    # Push right when this weighted state is positive: mostly pole angle and its rate; the small
    # cart terms lean the pole back toward the centre so the cart stays on the track for 500 steps.
    GAINS = np.array([0.1, 0.5, 1.0, 0.5])  # x, x_dot, theta, theta_dot

    def greedy(self, obs: np.ndarray) -> int:
        return int(float(self.GAINS @ obs) > 0.0)


@SOURCES.register("acrobot")
class AcrobotSource(DiscreteControlSource):
    """Acrobot-v1 episodes of an energy-pumping controller with ε-random actions."""

    env_id = "Acrobot-v1"
    num_actions = 3  # torque -1, 0, +1 on the second (actuated) joint

    def greedy(self, obs: np.ndarray) -> int:
        # Torque on joint 2 reacts on link 1 with the opposite sign, so torquing against link 1's
        # angular velocity pushes link 1 along its swing: it pumps energy every half period.
        # (The opposite sign damps the swing and never reaches the goal in 200 steps.)
        return 0 if obs[4] > 0.0 else 2


@SOURCES.register("pendulum")
class PendulumSource(ControlSource):
    """Pendulum-v1 episodes of energy-based swing-up plus PD balancing, with Gaussian torque noise."""

    env_id = "Pendulum-v1"
    Options = ContinuousControlOptions
    MAX_TORQUE = 2.0
    # Pendulum-v1 dynamics: theta_ddot = 3g/(2l) sin(theta) + 3/(m l^2) u = 15 sin(theta) + 3 u
    # (theta = 0 upright), so E = theta_dot^2 / 2 + 15 cos(theta) is conserved without torque,
    # equals 15 at rest upright, and dE/dt = 3 u theta_dot.
    E_TOP = 15.0
    K_ENERGY, KP, KD, NEAR_TOP_COS = 1.0, 10.0, 2.0, 0.8

    def __init__(self, options: Any, split: str = "all"):
        super().__init__(options, split)
        if options.noise < 0:
            raise MMToolError(f"--opt noise={options.noise}: expected a standard deviation >= 0")

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cos, sin, vel = (float(v) for v in obs)
        theta = math.atan2(sin, cos)
        if cos > self.NEAR_TOP_COS:  # near the top: PD on angle and rate
            u = -self.KP * theta - self.KD * vel
        else:  # swing up: push along the motion while energy is short of the top's
            energy = 0.5 * vel * vel + self.E_TOP * cos
            u = self.K_ENERGY * (self.E_TOP - energy) * (1.0 if vel >= 0 else -1.0)
        u += self.options.noise * float(rng.standard_normal())
        return np.array([min(max(u, -self.MAX_TORQUE), self.MAX_TORQUE)], np.float32)

    def action_field(self, actions: list) -> Field:
        return Field("action", "action", np.asarray(actions, np.float32).reshape(-1, 1),  # [T, 1]
                     tokenizer="mulaw")
