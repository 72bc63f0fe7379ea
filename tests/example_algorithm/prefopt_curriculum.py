"""A curriculum as a prefopt algorithm plugin: every epoch trains on the pairs from the shortest to the longest
(Bengio et al. 2009), and logs how long each step's pairs are."""

from pydantic import Field

from prefopt import Algorithm, AlgorithmConfig, Phase, derive_recipe, engine, hookimpl


class CurriculumConfig(AlgorithmConfig):
    longest_first: bool = Field(False, description="Take the longest pairs first instead (an anti-curriculum).")


class ShortToLong(Phase):
    """The engine's run, with every epoch's batches cut from the pairs sorted by length."""

    def __init__(self, longest_first: bool) -> None:
        super().__init__()
        self.longest_first = longest_first

    def start(self, ctx):
        pairs, self.batch_size = ctx.train_pairs.pairs, ctx.recipe.train.batch_size
        self.lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
        self.order = sorted(range(len(pairs)), key=self.lengths.__getitem__, reverse=self.longest_first)
        ctx.summary["algorithm"] = "curriculum"

    def pairs_of_step(self, step):
        k = step % (len(self.order) // self.batch_size)  # the same order every epoch, full batches only
        return self.order[k * self.batch_size : (k + 1) * self.batch_size]

    def before_step(self, ctx, step):
        lengths = [self.lengths[i] for i in self.pairs_of_step(step)]
        return {"curriculum/tokens": sum(lengths) / len(lengths)}


class Curriculum(Algorithm):
    """Curriculum: each epoch trains on the shortest pairs first and the longest last."""

    name, Config, paper = "curriculum", CurriculumConfig, "Bengio et al. 2009, Curriculum Learning, ICML"

    def run(self, recipe, plugins, *, show_progress=True):
        derived = derive_recipe(recipe, plugins, {"algorithm": None}, f"{recipe.output.dir} (curriculum)")
        phase = ShortToLong(self.config.longest_first)
        return engine.train(derived, plugins, phase=phase, show_progress=show_progress)


@hookimpl
def prefopt_register_algorithms():
    return [Curriculum]
