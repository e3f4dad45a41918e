// Learning-rate schedules: lr(step) for 0-based global steps over a run of totalSteps steps,
// the same formulas as edgeplug/schedules.py (docs/device-runtime.md).

export function makeSchedule(baseLr, spec, totalSteps) {
  const s = spec || {name: 'constant'};
  const warmup = Math.trunc(s.warmup_steps ?? 0);
  const final = Number(s.final_lr_fraction ?? 0);
  const decayed = (step) => {
    const span = Math.max(totalSteps - warmup, 1);
    const progress = Math.min(Math.max(step - warmup, 0) / span, 1);
    switch (s.name) {
      case 'linear': return baseLr * (1 - (1 - final) * progress);
      case 'cosine': return baseLr * (final + (1 - final) * 0.5 * (1 + Math.cos(Math.PI * progress)));
      case 'step': return baseLr * Number(s.gamma ?? 0.1) ** Math.floor(Math.max(step - warmup, 0) / Math.trunc(s.step_size ?? 1));
      case 'constant': case undefined: return baseLr;
      default: throw new Error(`unknown learning-rate schedule '${s.name}'`);
    }
  };
  return (step) => (step < warmup ? (baseLr * (step + 1)) / warmup : decayed(step));
}
