"""How much the loss asks of the instruction, from the data: only the frames both instructions'
histories share, with chunks that differ, need it — the first frame of each scene pair, and
every frame of a counterfactual twin (with its source's frame)."""

from __future__ import annotations

from pathlib import Path

from mobile_vla.analysis.ambiguity import data_ambiguity, scene_pairs
from mobile_vla.config import DataConfig, SimConfig
from mobile_vla.data.episodes import load_episodes
from mobile_vla.sim.collect import collect
from mobile_vla.sim.scenario import parse_scenarios


def test_only_the_first_frame_of_a_pair_needs_the_instruction(tmp_path: Path) -> None:
    cells = parse_scenarios(["1box_left_far", "1box_right_far"])
    sim = SimConfig(image_size=[32, 32], episode_length=12)
    collect(tmp_path, 4, cells, seed=2, cfg=sim, progress=False, counterfactual=True)
    episodes = load_episodes(DataConfig(path=str(tmp_path)))
    assert len(scene_pairs(episodes)) == 2  # twins are not recorded episodes
    d = data_ambiguity(tmp_path)
    assert d["pairs"] == 2 and d["first_different_frame"] == {"1": 2}
    assert d["supervised_pairs"] == 4 * 12
    assert d["instruction_only_pairs"] == 4  # frame 0 of each of the 4 episodes
    twins = d["with_twins"]
    assert twins["twins"] == 4 and twins["supervised_pairs"] > 48
    assert twins["instruction_only_share"] > 5 * d["instruction_only_share"]
