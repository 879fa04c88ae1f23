// Release versions: MAJOR.MINOR.PATCH with an optional pre-release tag (a pre-release sorts before its
// release). Pure.
const RE = /^(\d{1,9})\.(\d{1,9})\.(\d{1,9})(?:-([0-9A-Za-z.]{1,20}))?$/;

export function isVersion(v: string): boolean {
  return RE.test(v);
}

/** <0, 0, >0 as a is older than, equal to or newer than b; an unparsable version is the oldest. */
export function compareVersions(a: string, b: string): number {
  const x = RE.exec(a);
  const y = RE.exec(b);
  if (!x || !y) return (x ? 1 : 0) - (y ? 1 : 0);
  for (let i = 1; i <= 3; i++) {
    const d = Number(x[i]) - Number(y[i]);
    if (d) return d;
  }
  if (x[4] === y[4]) return 0;
  if (x[4] === undefined) return 1;
  if (y[4] === undefined) return -1;
  return x[4] < y[4] ? -1 : 1;
}
