// The version of this build, as package.json names it (the file ships beside dist/ in the
// container and in an npm install).
import { readFileSync } from 'node:fs';

export const VERSION: string = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
