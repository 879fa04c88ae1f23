// A progress bar on stderr: redrawn in place on a terminal, a line per quarter otherwise (CI logs).
export function createProgressBar(label: string, stream: NodeJS.WriteStream = process.stderr): { update(done: number, total: number): void; finish(): void } {
  let lastQuarter = -1;
  let lastDraw = 0;
  const mb = (n: number): string => (n / 1048576).toFixed(1);
  return {
    update(done, total) {
      const frac = total > 0 ? Math.min(1, done / total) : 1;
      if (stream.isTTY) {
        const now = Date.now();
        if (now - lastDraw < 100 && frac < 1) return;
        lastDraw = now;
        const width = 30;
        const filled = Math.round(frac * width);
        stream.write(`\r${label} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(frac * 100).toFixed(0).padStart(3)}% ${mb(done)}/${mb(total)} MB`);
      } else {
        const quarter = Math.floor(frac * 4);
        if (quarter > lastQuarter) {
          lastQuarter = quarter;
          stream.write(`${label}: ${(frac * 100).toFixed(0)}% (${mb(done)}/${mb(total)} MB)\n`);
        }
      }
    },
    finish() {
      if (stream.isTTY) stream.write('\n');
    },
  };
}
