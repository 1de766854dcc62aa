// The deployment artefacts checked against the code they deploy, so neither can drift:
// deploy/kubernetes (every YAML document), deploy/grafana-dashboard.json, deploy/Dockerfile,
// .dockerignore and deploy/healthcheck.mjs. Names, ports and defaults are read from
// src/config.ts and src/metrics.ts, never restated here.
import { execFile } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';
import { SETTINGS, loadConfig, parseHostPort, type Config } from '../../src/config.js';
import { Metrics } from '../../src/metrics.js';
import { DEFAULT_WS_CLOSE_TIMEOUT_MS } from '../../src/proxy/server.js';
import { NODE_FLAGS } from '../../src/node-flags.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const KUBERNETES_DIR = path.join(ROOT, 'deploy/kubernetes');

// ---------------------------------------------------------------------------------------
// Minimal shapes of the Kubernetes objects the checks read.

type Labels = Record<string, string>;
interface ObjectMeta {
  name: string;
  labels?: Labels;
  annotations?: Record<string, string>;
}
interface Manifest {
  apiVersion?: string;
  kind?: string;
  metadata?: ObjectMeta;
}
interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: { fieldRef?: { fieldPath: string }; secretKeyRef?: { name: string; key: string; optional?: boolean } };
}
interface ContainerPort {
  name?: string;
  containerPort: number;
  protocol?: string;
}
interface Probe {
  httpGet?: { path: string; port: number | string; scheme?: string };
}
interface SecurityContext {
  runAsNonRoot?: boolean;
  runAsUser?: number;
  allowPrivilegeEscalation?: boolean;
  readOnlyRootFilesystem?: boolean;
  capabilities?: { drop?: string[]; add?: string[] };
}
interface Container {
  name: string;
  image: string;
  env?: EnvVar[];
  ports?: ContainerPort[];
  livenessProbe?: Probe;
  readinessProbe?: Probe;
  lifecycle?: { preStop?: { exec?: { command: string[] } } };
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> };
  securityContext?: SecurityContext;
}
interface PodSpec {
  containers: Container[];
  terminationGracePeriodSeconds?: number;
  enableServiceLinks?: boolean;
  securityContext?: SecurityContext;
}
interface Deployment extends Manifest {
  spec: { replicas: number; selector: { matchLabels: Labels }; template: { metadata: ObjectMeta; spec: PodSpec } };
}
interface Service extends Manifest {
  spec: {
    type?: string;
    clusterIP?: string;
    publishNotReadyAddresses?: boolean;
    selector: Labels;
    ports: { name?: string; port: number; targetPort?: number | string }[];
  };
}
interface PodDisruptionBudget extends Manifest {
  spec: { minAvailable?: number | string; maxUnavailable?: number | string; selector: { matchLabels: Labels } };
}
interface NetworkPolicyPeer {
  podSelector?: { matchLabels?: Labels };
  namespaceSelector?: { matchLabels?: Labels };
  ipBlock?: { cidr: string };
}
interface NetworkPolicyRule {
  from?: NetworkPolicyPeer[];
  ports?: { port?: number | string; endPort?: number; protocol?: string }[];
}
interface NetworkPolicy extends Manifest {
  spec: { podSelector: { matchLabels?: Labels }; policyTypes?: string[]; ingress?: NetworkPolicyRule[] };
}
interface Secret extends Manifest {
  data?: Record<string, string>;
  stringData?: Record<string, string>;
}
interface Kustomization extends Manifest {
  resources?: string[];
  components?: string[];
}

interface LoadedDocument {
  /** Path relative to deploy/kubernetes. */
  readonly file: string;
  readonly object: Manifest;
}

function yamlFilesUnder(dir: string): string[] {
  const files: string[] = [];
  for (const entry of readdirSync(dir)) {
    const full = path.join(dir, entry);
    if (statSync(full).isDirectory()) files.push(...yamlFilesUnder(full));
    else if (/\.ya?ml$/.test(entry)) files.push(full);
  }
  return files.sort();
}

/** Every document of every YAML file under deploy/kubernetes; a syntax error fails loudly. */
function loadManifests(): LoadedDocument[] {
  const loaded: LoadedDocument[] = [];
  for (const full of yamlFilesUnder(KUBERNETES_DIR)) {
    const file = path.relative(KUBERNETES_DIR, full);
    for (const document of parseAllDocuments(readFileSync(full, 'utf8'))) {
      if (document.errors.length > 0) throw new Error(`${file}: ${document.errors.map((error) => error.message).join('; ')}`);
      const object: unknown = document.toJS();
      if (object === null || object === undefined) continue;
      loaded.push({ file, object: object as Manifest });
    }
  }
  return loaded;
}

const DOCUMENTS = loadManifests();

function objectsOfKind<T extends Manifest>(kind: string, file?: (name: string) => boolean): T[] {
  return DOCUMENTS.filter((entry) => entry.object.kind === kind && (file?.(entry.file) ?? true)).map((entry) => entry.object as T);
}

const inBase = (file: string): boolean => !file.includes(path.sep) && !file.endsWith('.example.yaml');

function only<T>(items: readonly T[], what: string): T {
  if (items.length !== 1) throw new Error(`expected exactly one ${what}, found ${items.length}`);
  return items[0]!;
}

/** True when a non-empty matchLabels selector selects an object carrying `labels`. */
function selects(matchLabels: Labels | undefined, labels: Labels | undefined): boolean {
  const entries = Object.entries(matchLabels ?? {});
  return entries.length > 0 && entries.every(([key, value]) => labels?.[key] === value);
}

/** The port a setting listens on by default: SETTINGS' fallback, parsed as the server does. */
function defaultPort(variable: string): number {
  const setting = SETTINGS[variable];
  if (!setting) throw new Error(`${variable} is not in SETTINGS`);
  const address = parseHostPort(setting.fallback);
  if (!address) throw new Error(`${variable}'s fallback "${setting.fallback}" is not host:port`);
  return address.port;
}

const DEPLOYMENT = only(objectsOfKind<Deployment>('Deployment'), 'Deployment');
const POD = DEPLOYMENT.spec.template;
const SIDECAR = only(
  POD.spec.containers.filter((container) => container.name === 'routesync'),
  'container named routesync',
);
const SIDECAR_ENV = SIDECAR.env ?? [];

function envVar(name: string): EnvVar {
  return only(
    SIDECAR_ENV.filter((variable) => variable.name === name),
    `env ${name} in the routesync container`,
  );
}

/** A probe or NetworkPolicy port (number or container port name) as a number. */
function resolvePort(port: number | string | undefined, container: Container): number | undefined {
  if (typeof port === 'number') return port;
  return container.ports?.find((candidate) => candidate.name === port)?.containerPort;
}

/**
 * The configuration the sidecar would load in a pod: its env with the downward API and the
 * Secret filled in by example values, $(VAR) expanded the way the kubelet does (only
 * variables defined earlier in the list), then handed to the real loadConfig.
 */
const POD_IP = '10.1.2.3';
const POD_NAMESPACE = 'sandboxes';
function sidecarEnvironment(): Record<string, string> {
  const environment: Record<string, string> = {};
  for (const variable of SIDECAR_ENV) {
    let value: string;
    const fieldPath = variable.valueFrom?.fieldRef?.fieldPath;
    if (fieldPath === 'status.podIP') value = POD_IP;
    else if (fieldPath === 'metadata.namespace') value = POD_NAMESPACE;
    else if (variable.valueFrom?.secretKeyRef) value = 'example-peer-token';
    else if (variable.value !== undefined) value = variable.value;
    else throw new Error(`env ${variable.name} has neither a value nor a known source`);
    environment[variable.name] = value.replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (reference, name: string) => {
      const defined = environment[name];
      if (defined === undefined) throw new Error(`env ${variable.name} refers to ${reference}, which is not defined before it`);
      return defined;
    });
  }
  return environment;
}

function mebibytes(quantity: string | undefined): number {
  const match = /^(\d+)(Ki|Mi|Gi)$/.exec(quantity ?? '');
  if (!match) throw new Error(`memory quantity "${quantity}" is not <n>Ki|Mi|Gi`);
  return Number(match[1]) * { Ki: 1 / 1024, Mi: 1, Gi: 1024 }[match[2] as 'Ki' | 'Mi' | 'Gi'];
}

// ---------------------------------------------------------------------------------------
// Dockerfile parsing: instructions with continuations joined and comments dropped.

interface Instruction {
  readonly keyword: string;
  readonly args: string;
}
interface Stage {
  readonly image: string;
  readonly name: string | undefined;
  readonly instructions: Instruction[];
}

function parseDockerfile(text: string): Stage[] {
  const instructions: Instruction[] = [];
  let pending = '';
  for (const line of text.split('\n')) {
    const trimmed = line.trim();
    if (trimmed.startsWith('#') || (trimmed === '' && pending === '')) continue;
    if (trimmed.endsWith('\\')) {
      pending += `${trimmed.slice(0, -1)} `;
      continue;
    }
    const full = (pending + trimmed).trim();
    pending = '';
    const match = /^(\S+)\s*(.*)$/.exec(full);
    if (match) instructions.push({ keyword: match[1]!.toUpperCase(), args: match[2]! });
  }
  const stages: Stage[] = [];
  for (const instruction of instructions) {
    if (instruction.keyword === 'FROM') {
      const match = /^(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?$/i.exec(instruction.args);
      if (!match) throw new Error(`cannot read FROM ${instruction.args}`);
      stages.push({ image: match[1]!, name: match[2], instructions: [] });
    } else if (stages.length > 0) {
      stages.at(-1)!.instructions.push(instruction);
    } else if (instruction.keyword !== 'ARG') {
      throw new Error(`${instruction.keyword} before the first FROM`);
    }
  }
  return stages;
}

function execForm(args: string): string[] | undefined {
  try {
    const value: unknown = JSON.parse(args);
    return Array.isArray(value) && value.every((item) => typeof item === 'string') ? value : undefined;
  } catch {
    return undefined;
  }
}

/** COPY/ADD arguments without their --flags: sources then destination. */
function copyOperands(args: string): { flags: string[]; sources: string[]; destination: string } {
  const words = execForm(args) ?? args.split(/\s+/).filter((word) => word !== '');
  const flags = words.filter((word) => word.startsWith('--'));
  const operands = words.filter((word) => !word.startsWith('--'));
  return { flags, sources: operands.slice(0, -1), destination: operands.at(-1) ?? '' };
}

/** .dockerignore semantics: the last pattern matching the path or one of its parents wins. */
function dockerignoreAdmits(patterns: readonly string[], file: string): boolean {
  const parts = file.split('/');
  const candidates = parts.map((_, index) => parts.slice(0, index + 1).join('/'));
  let excluded = false;
  for (const raw of patterns) {
    const negated = raw.startsWith('!');
    const pattern = path.posix.normalize(negated ? raw.slice(1) : raw).replace(/\/$/, '');
    const source = pattern
      .split(/(\*\*|\*|\?)/)
      .map((part) => (part === '**' ? '.*' : part === '*' ? '[^/]*' : part === '?' ? '[^/]' : part.replace(/[.+^${}()|[\]\\]/g, '\\$&')))
      .join('');
    const regex = new RegExp(`^${source}$`);
    if (candidates.some((candidate) => regex.test(candidate))) excluded = !negated;
  }
  return !excluded;
}

function filesUnder(relative: string): string[] {
  const full = path.join(ROOT, relative);
  if (!statSync(full).isDirectory()) return [relative];
  return readdirSync(full).flatMap((entry) => filesUnder(path.posix.join(relative, entry)));
}

const DOCKERFILE = readFileSync(path.join(ROOT, 'deploy/Dockerfile'), 'utf8');
const STAGES = parseDockerfile(DOCKERFILE);
const RUNTIME = STAGES.at(-1)!;
const PACKAGE = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { bin: Record<string, string>; scripts: Record<string, string> };

function dockerfileUser(): { uid: number } {
  const users = RUNTIME.instructions.filter((instruction) => instruction.keyword === 'USER');
  const user = users.at(-1)?.args ?? 'root';
  // Numeric, because Kubernetes' runAsNonRoot cannot verify a user name.
  const match = /^(\d+)(?::(\d+))?$/.exec(user);
  if (!match) throw new Error(`USER "${user}" is not numeric uid[:gid]`);
  return { uid: Number(match[1]) };
}

// ---------------------------------------------------------------------------------------

describe('deploy/kubernetes', () => {
  it('parses every YAML document into an object with a kind, and every Kubernetes object has a name', () => {
    expect(DOCUMENTS.length).toBeGreaterThan(0);
    for (const { file, object } of DOCUMENTS) {
      expect(object.kind, `${file}: kind`).toMatch(/^[A-Z][A-Za-z]+$/);
      expect(object.apiVersion, `${file}: apiVersion`).toMatch(/\S/);
      if (!['Kustomization', 'Component'].includes(object.kind!)) {
        expect(object.metadata?.name, `${file}: metadata.name`).toMatch(/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/);
      }
    }
  });

  it('the kustomization lists every base manifest and leaves the example Secret out', () => {
    const kustomization = only(
      DOCUMENTS.filter((entry) => entry.file === 'kustomization.yaml').map((entry) => entry.object as Kustomization),
      'kustomization.yaml',
    );
    const resources = [...(kustomization.resources ?? [])].sort();
    const baseFiles = yamlFilesUnder(KUBERNETES_DIR)
      .map((full) => path.relative(KUBERNETES_DIR, full))
      .filter((file) => inBase(file) && file !== 'kustomization.yaml')
      .sort();
    expect(resources).toEqual(baseFiles);
    expect(resources).not.toContain('secret.example.yaml');
    expect(objectsOfKind<Secret>('Secret', inBase), 'no Secret in the base').toHaveLength(0);

    // Components: each names files that exist next to it.
    for (const entry of DOCUMENTS.filter((candidate) => candidate.object.kind === 'Component')) {
      const component = entry.object as Kustomization;
      expect(component.resources?.length, `${entry.file}: resources`).toBeGreaterThan(0);
      for (const resource of component.resources ?? []) {
        expect(existsSync(path.join(KUBERNETES_DIR, path.dirname(entry.file), resource)), `${entry.file} -> ${resource}`).toBe(true);
      }
    }
  });

  it('uses only ROUTESYNC_* variables that src/config.ts reads, in env and in comments alike', () => {
    const envNames = SIDECAR_ENV.map((variable) => variable.name).filter((name) => name.startsWith('ROUTESYNC_'));
    expect(envNames).toEqual(expect.arrayContaining(['ROUTESYNC_PEER_DNS', 'ROUTESYNC_SELF', 'ROUTESYNC_PEER_TOKEN']));
    for (const name of envNames) expect(Object.keys(SETTINGS), `${name} in the routesync container`).toContain(name);

    for (const full of yamlFilesUnder(KUBERNETES_DIR)) {
      for (const name of readFileSync(full, 'utf8').match(/ROUTESYNC_[A-Z0-9_]+/g) ?? []) {
        expect(Object.keys(SETTINGS), `${name} in ${path.relative(ROOT, full)}`).toContain(name);
      }
    }
    // No other container is configured as a routesync replica by mistake.
    for (const container of POD.spec.containers.filter((candidate) => candidate !== SIDECAR)) {
      expect((container.env ?? []).filter((variable) => variable.name.startsWith('ROUTESYNC_')), container.name).toEqual([]);
    }
  });

  describe('the sidecar configuration a pod would load', () => {
    let config: Config;
    beforeAll(() => {
      config = loadConfig(sidecarEnvironment());
    });

    it('is accepted by loadConfig and keeps the local API on loopback', () => {
      expect(config.apiAddr).toEqual({ host: '127.0.0.1', port: defaultPort('ROUTESYNC_API_ADDR') });
      expect(parseHostPort(SETTINGS.ROUTESYNC_API_ADDR!.fallback)?.host).toBe('127.0.0.1');
      expect(config.peerToken).toBe('example-peer-token');
      expect(config.self).toBe(`${POD_IP}:${defaultPort('ROUTESYNC_PEER_ADDR')}`);
    });

    it('exposes exactly the peer and data-plane ports, which are the defaults in SETTINGS', () => {
      const peerPort = defaultPort('ROUTESYNC_PEER_ADDR');
      const proxyPort = defaultPort('ROUTESYNC_PROXY_ADDR');
      expect(config.peerAddr.port).toBe(peerPort);
      expect(config.proxyAddr.port).toBe(proxyPort);
      const ports = (SIDECAR.ports ?? []).map((port) => port.containerPort).sort((a, b) => a - b);
      expect(ports).toEqual([peerPort, proxyPort].sort((a, b) => a - b));
      // The local API listens on loopback: declaring it as a container port would only mislead.
      expect(ports).not.toContain(defaultPort('ROUTESYNC_API_ADDR'));
    });

    it('probes /healthz (liveness) and /readyz (readiness) over plain HTTP on the peer port', () => {
      const peerPort = defaultPort('ROUTESYNC_PEER_ADDR');
      expect(config.peerTlsCert, 'TLS would need scheme: HTTPS on the probes').toBe('');
      const liveness = SIDECAR.livenessProbe?.httpGet;
      const readiness = SIDECAR.readinessProbe?.httpGet;
      expect(liveness?.path).toBe('/healthz');
      expect(readiness?.path).toBe('/readyz');
      expect(resolvePort(liveness?.port, SIDECAR)).toBe(peerPort);
      expect(resolvePort(readiness?.port, SIDECAR)).toBe(peerPort);
      expect(liveness?.scheme ?? 'HTTP').toBe('HTTP');
      expect(readiness?.scheme ?? 'HTTP').toBe('HTTP');
    });

    it('asks Prometheus to scrape /metrics on the peer port', () => {
      const annotations = POD.metadata.annotations ?? {};
      expect(annotations['prometheus.io/scrape']).toBe('true');
      expect(annotations['prometheus.io/port']).toBe(String(defaultPort('ROUTESYNC_PEER_ADDR')));
      expect(annotations['prometheus.io/path']).toBe('/metrics');
    });

    it('gives the pod a termination grace period above the preStop pause plus ROUTESYNC_SHUTDOWN_GRACE_MS and the WebSockets\' close', () => {
      const preStop = SIDECAR.lifecycle?.preStop?.exec?.command;
      let preStopMs = 0;
      if (preStop) {
        expect(preStop.slice(0, 1), 'preStop is a plain sleep').toEqual(['sleep']);
        preStopMs = Number(preStop[1]) * 1000;
        expect(Number.isFinite(preStopMs)).toBe(true);
      }
      const terminationMs = (POD.spec.terminationGracePeriodSeconds ?? 30) * 1000;
      // The drain closes open WebSockets (1001) at the end of the grace and gives their close
      // handshake its own timeout; a second more for the process to exit.
      expect(terminationMs).toBeGreaterThanOrEqual(preStopMs + config.shutdownGraceMs + DEFAULT_WS_CLOSE_TIMEOUT_MS + 1000);
    });
  });

  it('discovers peers through a headless Service that publishes booting pods and selects the Deployment\'s pods', () => {
    const peerPort = defaultPort('ROUTESYNC_PEER_ADDR');
    const peerDns = envVar('ROUTESYNC_PEER_DNS').value ?? '';
    const match = /^([a-z0-9-]+)\.\$\(([A-Z_]+)\)\.svc\.[a-z0-9.-]+:(\d+)$/.exec(peerDns);
    expect(match, `ROUTESYNC_PEER_DNS "${peerDns}" is <service>.$(<namespace var>).svc.<cluster domain>:<port>`).not.toBeNull();
    const [, serviceName, namespaceVariable, port] = match!;
    expect(envVar(namespaceVariable!).valueFrom?.fieldRef?.fieldPath).toBe('metadata.namespace');
    expect(Number(port)).toBe(peerPort);

    const service = only(
      objectsOfKind<Service>('Service', inBase).filter((candidate) => candidate.metadata?.name === serviceName),
      `Service ${serviceName}`,
    );
    expect(service.spec.clusterIP).toBe('None');
    expect(service.spec.publishNotReadyAddresses).toBe(true);
    expect(selects(service.spec.selector, POD.metadata.labels)).toBe(true);
    const servicePort = only(service.spec.ports, `port of Service ${serviceName}`);
    expect(servicePort.port).toBe(peerPort);
    expect(resolvePort(servicePort.targetPort ?? servicePort.port, SIDECAR)).toBe(peerPort);

    expect(selects(DEPLOYMENT.spec.selector.matchLabels, POD.metadata.labels), 'Deployment selects its own pods').toBe(true);
    expect(DEPLOYMENT.spec.replicas).toBe(3);
  });

  it('names each pod by its own IP in ROUTESYNC_SELF, so it drops itself from the DNS answer', () => {
    const self = envVar('ROUTESYNC_SELF').value ?? '';
    const match = /^\$\(([A-Z_]+)\):(\d+)$/.exec(self);
    expect(match, `ROUTESYNC_SELF "${self}" is $(<pod IP var>):<port>`).not.toBeNull();
    expect(envVar(match![1]!).valueFrom?.fieldRef?.fieldPath).toBe('status.podIP');
    expect(Number(match![2])).toBe(defaultPort('ROUTESYNC_PEER_ADDR'));
  });

  it('serves the data plane through a ClusterIP Service on the data-plane port', () => {
    const proxyPort = defaultPort('ROUTESYNC_PROXY_ADDR');
    const services = objectsOfKind<Service>('Service', inBase).filter((service) => service.spec.clusterIP !== 'None');
    const service = only(services, 'ClusterIP Service');
    expect(service.spec.type ?? 'ClusterIP').toBe('ClusterIP');
    expect(selects(service.spec.selector, POD.metadata.labels)).toBe(true);
    const port = only(service.spec.ports, 'data-plane Service port');
    expect(port.port).toBe(proxyPort);
    expect(resolvePort(port.targetPort ?? port.port, SIDECAR)).toBe(proxyPort);
  });

  it('admits the peer port only from the app\'s own pods, and the data plane from anywhere', () => {
    const peerPort = defaultPort('ROUTESYNC_PEER_ADDR');
    const proxyPort = defaultPort('ROUTESYNC_PROXY_ADDR');
    const policy = only(objectsOfKind<NetworkPolicy>('NetworkPolicy', inBase), 'NetworkPolicy in the base');
    expect(selects(policy.spec.podSelector.matchLabels, POD.metadata.labels)).toBe(true);
    expect(policy.spec.policyTypes).toContain('Ingress');

    const admits = (rule: NetworkPolicyRule, port: number): boolean =>
      rule.ports === undefined ||
      rule.ports.length === 0 ||
      rule.ports.some((candidate) => {
        const first = resolvePort(candidate.port, SIDECAR);
        if (candidate.port === undefined) return true;
        return first !== undefined && port >= first && port <= (candidate.endPort ?? first);
      });
    const rules = policy.spec.ingress ?? [];
    const peerRules = rules.filter((rule) => admits(rule, peerPort));
    expect(peerRules.length, 'some rule admits the peers').toBeGreaterThan(0);
    for (const rule of peerRules) {
      expect(rule.from?.length, 'a rule covering the peer port names its sources').toBeGreaterThan(0);
      for (const source of rule.from ?? []) {
        expect(source.ipBlock).toBeUndefined();
        expect(source.namespaceSelector, 'no other namespace').toBeUndefined();
        expect(selects(source.podSelector?.matchLabels, POD.metadata.labels), 'the source is the app\'s pods').toBe(true);
        expect(source.podSelector?.matchLabels).toEqual(DEPLOYMENT.spec.selector.matchLabels);
      }
    }
    const proxyRules = rules.filter((rule) => admits(rule, proxyPort));
    expect(proxyRules.some((rule) => rule.from === undefined || rule.from.length === 0)).toBe(true);

    // The optional Prometheus component opens the peer port, and nothing else, to one selected
    // namespace's selected pods.
    const extra = objectsOfKind<NetworkPolicy>('NetworkPolicy', (file) => !inBase(file));
    for (const component of extra) {
      expect(selects(component.spec.podSelector.matchLabels, POD.metadata.labels)).toBe(true);
      for (const rule of component.spec.ingress ?? []) {
        expect(rule.ports?.map((port) => resolvePort(port.port, SIDECAR))).toEqual([peerPort]);
        for (const source of rule.from ?? []) {
          expect(source.ipBlock).toBeUndefined();
          expect(Object.keys(source.namespaceSelector?.matchLabels ?? {}).length).toBeGreaterThan(0);
          expect(Object.keys(source.podSelector?.matchLabels ?? {}).length).toBeGreaterThan(0);
        }
        expect(rule.from?.length).toBeGreaterThan(0);
      }
    }
  });

  it('keeps two of three replicas through voluntary disruptions', () => {
    const budget = only(objectsOfKind<PodDisruptionBudget>('PodDisruptionBudget', inBase), 'PodDisruptionBudget');
    expect(selects(budget.spec.selector.matchLabels, POD.metadata.labels)).toBe(true);
    expect(budget.spec.minAvailable).toBe(2);
    // Equal to the replicas, a drain could never evict anything.
    expect(budget.spec.minAvailable as number).toBeLessThan(DEPLOYMENT.spec.replicas);
  });

  it('reads the peer token from the Secret that secret.example.yaml describes', () => {
    const reference = envVar('ROUTESYNC_PEER_TOKEN').valueFrom?.secretKeyRef;
    expect(reference).toBeDefined();
    expect(reference?.optional ?? false, 'a missing Secret must stop the pod, not disable auth').toBe(false);
    const example = only(
      DOCUMENTS.filter((entry) => entry.file === 'secret.example.yaml' && entry.object.kind === 'Secret').map((entry) => entry.object as Secret),
      'Secret in secret.example.yaml',
    );
    expect(example.metadata?.name).toBe(reference?.name);
    expect(Object.keys({ ...example.data, ...example.stringData })).toContain(reference?.key);
  });

  it('runs the sidecar as the image\'s non-root user, read-only, without capabilities, with memory bounds', () => {
    expect(POD.spec.securityContext?.runAsNonRoot).toBe(true);
    const context = SIDECAR.securityContext ?? {};
    expect(context.readOnlyRootFilesystem).toBe(true);
    expect(context.allowPrivilegeEscalation).toBe(false);
    expect(context.capabilities?.drop).toContain('ALL');
    expect(context.capabilities?.add ?? []).toEqual([]);
    expect(context.runAsUser).toBe(dockerfileUser().uid);
    // Service links would inject ROUTESYNC_<SERVICE>_PORT-style variables into the sidecar.
    expect(POD.spec.enableServiceLinks).toBe(false);

    const requests = SIDECAR.resources?.requests ?? {};
    const limits = SIDECAR.resources?.limits ?? {};
    expect(requests.cpu).toMatch(/^\d+m?$/);
    expect(mebibytes(requests.memory)).toBeGreaterThan(0);
    expect(mebibytes(limits.memory)).toBeGreaterThanOrEqual(mebibytes(requests.memory));
  });
});

// ---------------------------------------------------------------------------------------

describe('deploy/Dockerfile', () => {
  it('builds and runs on Node 24 in two stages', () => {
    expect(STAGES.length).toBeGreaterThanOrEqual(2);
    for (const stage of STAGES) expect(stage.image).toMatch(/^node:24(?:[.-]|$)/);
    const build = STAGES[0]!;
    expect(build.instructions.some((instruction) => instruction.keyword === 'RUN' && /\bnpm ci\b/.test(instruction.args))).toBe(true);
    expect(build.instructions.some((instruction) => instruction.keyword === 'RUN' && /\bnpm run build\b/.test(instruction.args))).toBe(true);
    const fromBuild = RUNTIME.instructions.filter((instruction) => instruction.keyword === 'COPY' && instruction.args.includes(`--from=${build.name}`));
    expect(fromBuild.map((instruction) => copyOperands(instruction.args).sources)).toContainEqual(['/app/dist']);
  });

  it('installs production dependencies only in the runtime stage', () => {
    const installs = RUNTIME.instructions.filter((instruction) => instruction.keyword === 'RUN' && /\bnpm (ci|install|i)\b/.test(instruction.args));
    expect(installs.length).toBeGreaterThan(0);
    for (const install of installs) expect(install.args).toMatch(/\bnpm ci\b.*(--omit[= ]dev|--omit-dev|--production\b|--only[= ]prod)/);
  });

  it('downloads nothing but npm packages', () => {
    for (const stage of STAGES) {
      for (const instruction of stage.instructions) {
        if (instruction.keyword === 'RUN') expect(instruction.args).not.toMatch(/\b(curl|wget|apt-get|apt|apk|git|pip)\b/);
        if (instruction.keyword === 'ADD') expect(instruction.args).not.toMatch(/(https?|git):\/\/|git@/);
      }
    }
  });

  it('runs as a non-root numeric user', () => {
    expect(dockerfileUser().uid).toBeGreaterThan(0);
  });

  it('starts dist/main.js with node as PID 1 (exec form) and the V8 flags of src/node-flags.ts, the file package.json names as the binary', () => {
    const entrypoint = RUNTIME.instructions.filter((instruction) => instruction.keyword === 'ENTRYPOINT').at(-1);
    const cmd = RUNTIME.instructions.filter((instruction) => instruction.keyword === 'CMD').at(-1);
    const command = [...(entrypoint ? (execForm(entrypoint.args) ?? ['<shell form>']) : []), ...(cmd ? (execForm(cmd.args) ?? ['<shell form>']) : [])];
    expect(command.slice(0, 2 + NODE_FLAGS.length)).toEqual(['node', ...NODE_FLAGS, 'dist/main.js']);
    expect(path.posix.normalize(PACKAGE.bin.routesync ?? '')).toBe('dist/main.js');
    const buildConfig = JSON.parse(readFileSync(path.join(ROOT, 'tsconfig.build.json'), 'utf8')) as { compilerOptions: { outDir: string; rootDir: string } };
    expect(path.posix.normalize(buildConfig.compilerOptions.outDir)).toBe('dist');
  });

  it('`make run` and `npm start` launch routesync with the same V8 flags as the container', () => {
    const makeRun = /^run:.*\n\t(.+)$/m.exec(readFileSync(path.join(ROOT, 'Makefile'), 'utf8'))?.[1];
    const expected = ['node', ...NODE_FLAGS, 'dist/main.js'].join(' ');
    expect(makeRun).toBe(expected);
    expect(PACKAGE.scripts.start).toBe(expected);
  });

  it('checks health with node against the peer port\'s /healthz, and exposes the three default ports', () => {
    const healthcheck = only(
      RUNTIME.instructions.filter((instruction) => instruction.keyword === 'HEALTHCHECK'),
      'HEALTHCHECK',
    );
    const command = execForm(healthcheck.args.replace(/^(--\S+\s+)*CMD\s+/, ''));
    expect(command?.[0]).toBe('node');
    // The script it runs is the one copied into the image.
    const copied = RUNTIME.instructions
      .filter((instruction) => instruction.keyword === 'COPY' && !instruction.args.includes('--from='))
      .map((instruction) => copyOperands(instruction.args));
    const script = copied.find((operands) => path.posix.normalize(operands.destination) === path.posix.normalize(command?.[1] ?? ''));
    expect(script?.sources).toEqual(['deploy/healthcheck.mjs']);

    const exposed = RUNTIME.instructions
      .filter((instruction) => instruction.keyword === 'EXPOSE')
      .flatMap((instruction) => instruction.args.split(/\s+/))
      .map((port) => Number(port.replace(/\/tcp$/, '')))
      .sort((a, b) => a - b);
    const defaults = ['ROUTESYNC_API_ADDR', 'ROUTESYNC_PEER_ADDR', 'ROUTESYNC_PROXY_ADDR'].map(defaultPort).sort((a, b) => a - b);
    expect(exposed).toEqual(defaults);
  });

  it('sends the builder every file it copies and no node_modules, dist or .git', () => {
    const patterns = readFileSync(path.join(ROOT, '.dockerignore'), 'utf8')
      .split('\n')
      .map((line) => line.trim())
      .filter((line) => line !== '' && !line.startsWith('#'));
    for (const stage of STAGES) {
      for (const instruction of stage.instructions.filter((candidate) => candidate.keyword === 'COPY' && !candidate.args.includes('--from='))) {
        for (const source of copyOperands(instruction.args).sources) {
          expect(existsSync(path.join(ROOT, source)), `${source} exists`).toBe(true);
          for (const file of filesUnder(source)) expect(dockerignoreAdmits(patterns, file), `${file} reaches the builder`).toBe(true);
        }
      }
    }
    for (const file of ['node_modules/yaml/package.json', 'dist/main.js', '.git/HEAD', 'test/unit/deploy.test.ts', 'bench/run.ts']) {
      expect(dockerignoreAdmits(patterns, file), `${file} stays out`).toBe(false);
    }
  });
});

// ---------------------------------------------------------------------------------------

describe('deploy/healthcheck.mjs', () => {
  const script = path.join(ROOT, 'deploy/healthcheck.mjs');

  function runCheck(peerAddr: string): Promise<number> {
    return new Promise((resolve) => {
      // A clean environment: a TLS variable inherited from the shell must not change the check.
      execFile(process.execPath, [script], { env: { PATH: process.env.PATH ?? '', ROUTESYNC_PEER_ADDR: peerAddr }, timeout: 10_000 }, (error) => {
        resolve(error ? (typeof error.code === 'number' ? error.code : -1) : 0);
      });
    });
  }

  async function withServer<T>(status: number, body: (port: number) => Promise<T>): Promise<T> {
    const server: Server = createServer((request, response) => {
      response.statusCode = request.url === '/healthz' ? status : 404;
      response.end();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      return await body((server.address() as AddressInfo).port);
    } finally {
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  }

  it('exits 0 when /healthz answers 200, with the address in its wildcard forms', async () => {
    await withServer(200, async (port) => {
      expect(await runCheck(`0.0.0.0:${port}`)).toBe(0);
      expect(await runCheck(`:${port}`)).toBe(0);
    });
  });

  it('exits 1 when /healthz answers 503', async () => {
    await withServer(503, async (port) => {
      expect(await runCheck(`127.0.0.1:${port}`)).toBe(1);
    });
  });

  it('exits 1 when nothing listens, or the address is not host:port', async () => {
    const freedPort = await withServer(200, async (port) => port);
    expect(await runCheck(`127.0.0.1:${freedPort}`)).toBe(1);
    expect(await runCheck('not-an-address')).toBe(1);
  });
});

// ---------------------------------------------------------------------------------------

interface DashboardTarget {
  expr?: string;
  datasource?: { type?: string; uid?: string };
}
interface DashboardPanel {
  id: number;
  type: string;
  title: string;
  datasource?: { type?: string; uid?: string };
  targets?: DashboardTarget[];
  panels?: DashboardPanel[];
}
interface Dashboard {
  schemaVersion: number;
  uid: string;
  templating: { list: { name: string; type: string; query?: unknown; datasource?: { uid?: string } }[] };
  panels: DashboardPanel[];
}

interface RegisteredMetric {
  readonly type: string;
  readonly labelNames: readonly string[];
}

/** Labels Prometheus adds to every scraped series. */
const TARGET_LABELS = ['instance', 'job'];
const PROMQL_KEYWORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'and', 'or', 'unless', 'offset', 'inf', 'nan']);

/** The metrics an expression reads, with the labels it matches on each, and its grouping labels. */
function readPromQL(expr: string): { metrics: { name: string; labels: string[] }[]; grouping: string[] } {
  const text = expr.replace(/"(?:[^"\\]|\\.)*"/g, '""');
  const metrics: { name: string; labels: string[] }[] = [];
  const grouping: string[] = [];
  for (const match of text.matchAll(/\b(by|without)\s*\(([^)]*)\)/g)) {
    grouping.push(...match[2]!.split(',').map((label) => label.trim()).filter((label) => label !== ''));
  }
  const stripped = text.replace(/\b(by|without|on|ignoring)\s*\([^)]*\)/g, ' ').replace(/\[[^\]]*\]/g, ' ');
  for (const match of stripped.matchAll(/([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}/g)) {
    if (!match[1]) throw new Error(`a selector without a metric name in ${expr}`);
    metrics.push({ name: match[1], labels: [...match[2]!.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)/g)].map((label) => label[1]!) });
  }
  const bare = stripped.replace(/\{[^}]*\}/g, ' ');
  for (const match of bare.matchAll(/(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*[({])/g)) {
    const name = match[1]!;
    if (PROMQL_KEYWORDS.has(name.toLowerCase())) continue;
    if (!metrics.some((metric) => metric.name === name)) metrics.push({ name, labels: [] });
  }
  return { metrics, grouping };
}

/** A replica's metrics, those registered only with TLS included (the certificate's expiry). */
function withEveryMetric(): Metrics {
  const metrics = new Metrics();
  metrics.setPeerTlsCertExpiry(Date.now() / 1000 + 86_400);
  return metrics;
}

describe('deploy/grafana-dashboard.json', () => {
  const dashboard = JSON.parse(readFileSync(path.join(ROOT, 'deploy/grafana-dashboard.json'), 'utf8')) as Dashboard;
  const panels = dashboard.panels.flatMap((panel) => [panel, ...(panel.panels ?? [])]).filter((panel) => panel.type !== 'row');
  const registered = new Map<string, RegisteredMetric>();

  beforeAll(async () => {
    const metrics = withEveryMetric();
    for (const metric of await metrics.registry.getMetricsAsJSON()) {
      // prom-client keeps a metric's label names on the instance (not in the JSON).
      const labelNames = (metrics.registry.getSingleMetric(metric.name) as unknown as { labelNames?: readonly string[] }).labelNames;
      if (!Array.isArray(labelNames)) throw new Error(`cannot read the label names of ${metric.name} from prom-client`);
      registered.set(metric.name, { type: String(metric.type), labelNames });
    }
  });

  /** A PromQL series name -> the registered metric it belongs to (histogram/summary suffixes stripped). */
  function lookup(series: string): { name: string; metric: RegisteredMetric; bucket: boolean } | undefined {
    const exact = registered.get(series);
    if (exact) return { name: series, metric: exact, bucket: false };
    const match = /^(.*)_(bucket|sum|count)$/.exec(series);
    const base = match ? registered.get(match[1]!) : undefined;
    if (!base) return undefined;
    if (match![2] === 'bucket' ? base.type !== 'histogram' : !['histogram', 'summary'].includes(base.type)) return undefined;
    return { name: match![1]!, metric: base, bucket: match![2] === 'bucket' };
  }

  it('is a schemaVersion 39 dashboard with a Prometheus datasource variable that every query uses', () => {
    expect(dashboard.schemaVersion).toBeGreaterThanOrEqual(39);
    expect(dashboard.uid).toMatch(/\S/);
    const variable = only(
      dashboard.templating.list.filter((candidate) => candidate.name === 'datasource'),
      'datasource variable',
    );
    expect(variable.type).toBe('datasource');
    expect(variable.query).toBe('prometheus');
    expect(panels.length).toBeGreaterThan(0);
    const ids = dashboard.panels.flatMap((panel) => [panel, ...(panel.panels ?? [])]).map((panel) => panel.id);
    expect(new Set(ids).size, 'panel ids are unique').toBe(ids.length);
    for (const panel of panels) {
      expect(panel.datasource?.uid, panel.title).toBe('${datasource}');
      expect(panel.targets?.length, panel.title).toBeGreaterThan(0);
      for (const target of panel.targets ?? []) expect(target.datasource?.uid ?? '${datasource}', panel.title).toBe('${datasource}');
    }
    for (const other of dashboard.templating.list.filter((candidate) => candidate.type === 'query')) {
      expect(other.datasource?.uid, other.name).toBe('${datasource}');
    }
  });

  it('queries only metrics that new Metrics() registers, with their own label names', () => {
    expect(registered.size).toBeGreaterThan(0);
    for (const panel of panels) {
      for (const target of panel.targets ?? []) {
        const expr = target.expr ?? '';
        const { metrics, grouping } = readPromQL(expr);
        expect(metrics.length, `${panel.title}: ${expr} reads a metric`).toBeGreaterThan(0);
        const known: string[] = [...TARGET_LABELS];
        for (const series of metrics) {
          const found = lookup(series.name);
          expect(found, `${panel.title}: ${series.name} is registered in src/metrics.ts`).toBeDefined();
          const labels = [...found!.metric.labelNames, ...TARGET_LABELS, ...(found!.bucket ? ['le'] : [])];
          for (const label of series.labels) expect(labels, `${panel.title}: ${series.name}{${label}}`).toContain(label);
          known.push(...labels);
        }
        for (const label of grouping) expect(known, `${panel.title}: by (${label})`).toContain(label);
        if (expr.includes('histogram_quantile(')) {
          expect(metrics.some((series) => lookup(series.name)?.bucket), `${panel.title}: histogram_quantile over _bucket`).toBe(true);
          expect(grouping, `${panel.title}: histogram_quantile keeps le`).toContain('le');
        }
      }
    }
  });

  it('charts every metric an operator needs', () => {
    const charted = new Set(panels.flatMap((panel) => (panel.targets ?? []).flatMap((target) => readPromQL(target.expr ?? '').metrics.map((series) => lookup(series.name)?.name))));
    const needed = [
      'routesync_routes',
      'routesync_tombstones',
      'routesync_peers',
      'routesync_peers_ejected',
      'routesync_sync_duration_seconds',
      'routesync_peer_attempts_total',
      'routesync_peer_retries_total',
      'routesync_peer_failures_total',
      'routesync_peer_ejections_total',
      'routesync_peer_dns_resolutions_total',
      'routesync_outbox_routes',
      'routesync_outbox_dropped_total',
      'routesync_reconcile_rounds_total',
      'routesync_reconcile_routes_repaired_total',
      'routesync_reconcile_bytes_pulled_total',
      'routesync_convergence_lag_seconds',
      'routesync_proxy_requests_total',
      'routesync_proxy_request_duration_seconds',
      'routesync_proxy_websockets_active',
      'routesync_process_resident_memory_bytes',
      'routesync_process_open_fds',
      'routesync_peer_tls_cert_expiry_timestamp_seconds',
      'routesync_peer_tls_reloads_total',
    ];
    for (const name of needed) expect(charted, name).toContain(name);
  });
});

// ---------------------------------------------------------------------------------------

describe('docs/deploy.md', () => {
  const text = readFileSync(path.join(ROOT, 'docs/deploy.md'), 'utf8');

  it('names only real settings and metrics', async () => {
    for (const name of text.match(/ROUTESYNC_[A-Z0-9_]+/g) ?? []) expect(Object.keys(SETTINGS), name).toContain(name);
    const names = new Set((await withEveryMetric().registry.getMetricsAsJSON()).map((metric) => metric.name));
    for (const name of text.match(/\broutesync_[a-z0-9_]+/g) ?? []) {
      expect(names.has(name) || names.has(name.replace(/_(bucket|sum|count)$/, '')), name).toBe(true);
    }
  });
});
