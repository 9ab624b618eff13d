"""The closed loop: rounds of votes on the live app → preference pairs → DPO on Ray Train beside
the app → publish → gate → hot-add → the next round judges the new adapter against its
parent; a stable alias (`production`) follows the winners, with a canary share first.

Every step's outcome is a row in the store (`loops`, `loop_rounds`, `alias_events`), written
when the step is done, so `loop run --resume` after a kill continues where it stopped: a
round's votes are those stored before it closed (the page refuses later ones), the export is
made again from them (deterministically), and a round's DPO run is found published by its
name rather than trained twice (a run killed mid-way resumes from its Ray Train checkpoint).
"""
