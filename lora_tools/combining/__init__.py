"""Several adapters into one adapter — exact concatenation, best rank-k, TIES / DARE / pruning (`combine`).

Every method combines, per module, the scaled updates ΔWᵢ = sᵢ·Bᵢ·Aᵢ of the adapters
that have the module, with weights wᵢ:

- `cat` — exact: A stacked over B concatenated, with wᵢ·sᵢ folded into Aᵢ, rank Σ rᵢ;
  alpha = rank so the output scale is 1 (PEFT's `cat`).
- `svd` — the best rank-k approximation of Σ wᵢ·ΔWᵢ (Eckart–Young). When Σ rᵢ is small
  against the matrix it is computed without forming ΔW: QR of the stacked B and of the
  stacked Aᵀ, SVD of the small Σrᵢ × Σrᵢ core (the `resize` route); otherwise densely
  (PEFT's `svd`).
- `ties` — trim each ΔWᵢ to its largest-magnitude fraction `density`, elect a sign per
  element (sum of values, or count of signs), average the weighted values that agree
  (PEFT's `ties_svd`).
- `dare-linear` — drop each element of ΔWᵢ with probability 1 − density, rescale by
  1/density, weighted sum (PEFT's `dare_linear_svd`); unbiased: E = Σ wᵢ·ΔWᵢ.
- `dare-ties` — DARE's drop and rescale, then TIES' sign election and disjoint mean
  (PEFT's `dare_ties_svd`).
- `magnitude-prune` — trim each ΔWᵢ by magnitude to `density`, weighted sum (PEFT's
  `magnitude_prune_svd`).

The last four act on the full ΔWᵢ, as PEFT's `*_svd` variants do (PEFT's variants without
`_svd` prune the factors A and B separately, which is not the published method), and are
then re-factorised by truncated SVD to the rank rule. DARE draws its masks from a
generator seeded by (seed, module name), one adapter after another, so a run is
reproducible byte for byte and independent of module order. LoHa / LoKr / Tucker inputs
are formed into ΔW first.

`options` and `report` hold the method's options and its report, `plan` groups the
input modules, `methods` prunes and elects signs, `groups` computes one output module.
"""
