package injector

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/trustmesh/trustmesh/api/probe"
	"github.com/trustmesh/trustmesh/injector/bootstrap"
	"github.com/trustmesh/trustmesh/injector/capture"
)

// Config configures an Injector.
type Config struct {
	Mesh MeshConfig
	// Namespaces gives the labels that put a namespace's pods in ambient
	// mode. Nil: only pods' own labels do (offline, InjectManifests also
	// reads the Namespace objects of its input).
	Namespaces NamespaceLabels
}

// Injector injects pods. It is safe for concurrent use.
type Injector struct {
	s          *settings
	namespaces NamespaceLabels
}

// New checks cfg and returns an Injector. Every problem in the mesh config
// is reported at once, and a bootstrap is built to prove the config makes
// one.
func New(cfg Config) (*Injector, error) {
	s, err := cfg.Mesh.validate()
	if err != nil {
		return nil, err
	}
	inj := &Injector{s: s, namespaces: cfg.Namespaces}
	if _, err := inj.bootstrap(bootstrap.Sidecar, nil); err != nil {
		return nil, fmt.Errorf("injector: invalid mesh config: %w", err)
	}
	return inj, nil
}

// Mesh returns the mesh config in force, with defaults filled in.
func (inj *Injector) Mesh() MeshConfig { return inj.s.MeshConfig }

// status is the value of AnnotationStatus.
type status struct {
	Template       Template `json:"template"`
	InitContainers []string `json:"initContainers"`
	Containers     []string `json:"containers,omitempty"`
	Volumes        []string `json:"volumes"`
}

// InjectPod injects the pod with meta and spec, in namespace, in place. The
// namespace may be empty offline. A pod that must not be injected is left
// unchanged with the reason in the Result; a pod that must not start as it
// is gets a *Refusal.
func (inj *Injector) InjectPod(namespace string, meta *metav1.ObjectMeta, spec *corev1.PodSpec) (Result, error) {
	return inj.injectPod(namespace, meta, spec, inj.namespaces)
}

func (inj *Injector) injectPod(namespace string, meta *metav1.ObjectMeta, spec *corev1.PodSpec, namespaces NamespaceLabels) (Result, error) {
	m, s := meta.DeepCopy(), spec.DeepCopy()
	res, err := inj.inject(namespace, m, s, namespaces)
	if err == nil && res.Injected {
		*meta, *spec = *m, *s
	}
	return res, err
}

func (inj *Injector) inject(namespace string, meta *metav1.ObjectMeta, spec *corev1.PodSpec, namespaces NamespaceLabels) (Result, error) {
	if namespace == "" {
		namespace = meta.Namespace
	}
	if slices.Contains(systemNamespaces, namespace) || namespace == inj.s.ControlPlaneNamespace {
		return Result{Skipped: SkipExcludedNamespace}, nil
	}
	if spec.HostNetwork {
		return Result{Skipped: SkipHostNetwork}, nil
	}
	if inj.optedOut(meta) {
		return Result{Skipped: SkipOptedOut}, nil
	}
	amb, err := ambient(namespace, meta, namespaces)
	if err != nil {
		return Result{}, err
	}
	if amb {
		return injectAmbient(meta, spec)
	}
	if v, ok := meta.Annotations[AnnotationWorkloadAPI]; ok {
		return Result{}, refuse(RefusedWorkloadAPI, "annotation %s: %q asks for the node agent's Workload API, which only pods in ambient mode get "+
			"(label the pod or its namespace %s=%s); this pod gets a sidecar, whose agent serves its Workload API: remove the annotation",
			AnnotationWorkloadAPI, v, IstioLabelDataplaneMode, DataplaneModeAmbient)
	}
	if name, ok := istioProxy(meta, spec); ok {
		return Result{}, refuse(RefusedIstioProxy,
			"the pod already carries an Istio proxy (%s); trustmesh will not add a second sidecar: "+
				"turn Istio injection off for this pod or namespace, or opt the pod out with %s: \"false\"", name, InjectKey)
	}
	if raw, ok := meta.Annotations[AnnotationStatus]; ok {
		if err := checkInjected(raw, spec); err != nil {
			return Result{}, err
		}
		return Result{Skipped: SkipAlreadyInjected}, nil
	}
	tmpl := Template(meta.Annotations[AnnotationTemplate])
	if tmpl == "" {
		tmpl = TemplateSidecar
	}
	var st *status
	switch tmpl {
	case TemplateSidecar:
		st, err = inj.injectSidecar(meta, spec)
	case TemplateGateway:
		st, err = inj.injectGateway(meta, spec)
	default:
		return Result{}, refuse(RefusedTemplate, "annotation %s names template %q; the templates are %q and %q",
			AnnotationTemplate, tmpl, TemplateSidecar, TemplateGateway)
	}
	if err != nil {
		return Result{}, err
	}
	raw, err := json.Marshal(st)
	if err != nil {
		return Result{}, fmt.Errorf("injector: status: %w", err)
	}
	if meta.Annotations == nil {
		meta.Annotations = map[string]string{}
	}
	meta.Annotations[AnnotationStatus] = string(raw)
	return Result{Injected: true, Template: tmpl}, nil
}

func (inj *Injector) optedOut(meta *metav1.ObjectMeta) bool {
	keys := []string{InjectKey}
	if inj.s.IstioCompatibility {
		keys = append(keys, IstioInjectKey)
	}
	for _, k := range keys {
		for _, m := range []map[string]string{meta.Labels, meta.Annotations} {
			if v, ok := m[k]; ok {
				if b, err := strconv.ParseBool(v); err == nil && !b {
					return true
				}
			}
		}
	}
	return false
}

// istioProxy reports a sign that Istio has injected the pod.
func istioProxy(meta *metav1.ObjectMeta, spec *corev1.PodSpec) (string, bool) {
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		switch c.Name {
		case "istio-proxy", "istio-init", "istio-validation":
			return "container " + c.Name, true
		}
	}
	if _, ok := meta.Annotations[IstioStatus]; ok {
		return "annotation " + IstioStatus, true
	}
	return "", false
}

// checkInjected checks that a pod claiming injection has everything the
// claim names.
func checkInjected(raw string, spec *corev1.PodSpec) error {
	var st status
	if err := json.Unmarshal([]byte(raw), &st); err != nil {
		return refuse(RefusedPartial, "annotation %s is not trustmesh's: %w", AnnotationStatus, err)
	}
	var missing []string
	for _, n := range st.InitContainers {
		if !slices.ContainsFunc(spec.InitContainers, func(c corev1.Container) bool { return c.Name == n }) {
			missing = append(missing, "init container "+n)
		}
	}
	for _, n := range st.Containers {
		if !slices.ContainsFunc(spec.Containers, func(c corev1.Container) bool { return c.Name == n }) {
			missing = append(missing, "container "+n)
		}
	}
	for _, n := range st.Volumes {
		if !slices.ContainsFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == n }) {
			missing = append(missing, "volume "+n)
		}
	}
	if len(st.InitContainers) == 0 {
		return refuse(RefusedPartial, "annotation %s names nothing injected; remove it to inject the pod", AnnotationStatus)
	}
	if len(missing) > 0 {
		return refuse(RefusedPartial, "annotation %s says the pod is injected, but it lacks %s; remove the annotation to inject it",
			AnnotationStatus, strings.Join(missing, ", "))
	}
	return nil
}

// checkNames refuses a pod that already uses a name the injector adds.
func checkNames(spec *corev1.PodSpec, containers []string) error {
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		if slices.Contains(containers, c.Name) {
			return refuse(RefusedConflict, "the pod already has a container named %s, which trustmesh injects", c.Name)
		}
	}
	for _, v := range spec.Volumes {
		if slices.Contains([]string{VolumeSocket, VolumeToken, VolumeCARoot}, v.Name) {
			return refuse(RefusedConflict, "the pod already has a volume named %s, which trustmesh injects", v.Name)
		}
	}
	return nil
}

func (inj *Injector) injectSidecar(meta *metav1.ObjectMeta, spec *corev1.PodSpec) (*status, error) {
	if err := checkNames(spec, []string{ContainerInit, ContainerAgent, ContainerProxy}); err != nil {
		return nil, err
	}
	if err := inj.checkUIDs(spec); err != nil {
		return nil, err
	}
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		for _, p := range c.Ports {
			if slices.Contains(reservedPorts, p.ContainerPort) && (p.Protocol == "" || p.Protocol == corev1.ProtocolTCP) {
				return nil, refuse(RefusedConflict, "container %s declares port %d, which the trustmesh proxy uses (reserved: %v)",
					c.Name, p.ContainerPort, reservedPorts)
			}
		}
	}
	ex, err := inj.s.limits.Check(capture.Request{
		InboundPorts:  meta.Annotations[AnnotationExcludeInboundPorts],
		OutboundPorts: meta.Annotations[AnnotationExcludeOutboundPorts],
		OutboundCIDRs: meta.Annotations[AnnotationExcludeOutboundCIDRs],
	})
	if err != nil {
		return nil, &Refusal{Code: RefusedExclusion, Err: err}
	}
	probers, err := rewriteProbes(spec)
	if err != nil {
		return nil, err
	}
	rules := capture.Config{
		ProxyUID: inj.s.Proxy.UID, ProxyGID: inj.s.Proxy.GID,
		InboundPort: PortInbound, OutboundPort: PortOutbound,
		ExcludeInboundPorts:  append([]int32{PortAgent, PortReadiness}, ex.InboundPorts...),
		ExcludeOutboundPorts: ex.OutboundPorts,
		ExcludeOutboundCIDRs: ex.OutboundCIDRs,
	}
	agent, err := inj.agentContainer(probers)
	if err != nil {
		return nil, err
	}
	proxy, err := inj.proxyContainer(bootstrap.Sidecar, meta.Labels)
	if err != nil {
		return nil, err
	}
	proxy.RestartPolicy = ptr(corev1.ContainerRestartPolicyAlways)
	spec.InitContainers = append([]corev1.Container{inj.initContainer(rules), agent, proxy}, spec.InitContainers...)
	addVolumes(spec, inj.volumes())
	setLabel(meta, LabelProxy, string(bootstrap.Sidecar))
	return &status{
		Template:       TemplateSidecar,
		InitContainers: []string{ContainerInit, ContainerAgent, ContainerProxy},
		Volumes:        []string{VolumeSocket, VolumeToken, VolumeCARoot},
	}, nil
}

func (inj *Injector) injectGateway(meta *metav1.ObjectMeta, spec *corev1.PodSpec) (*status, error) {
	if err := checkNames(spec, []string{ContainerInit, ContainerAgent}); err != nil {
		return nil, err
	}
	i := slices.IndexFunc(spec.Containers, func(c corev1.Container) bool { return c.Name == ContainerProxy })
	if i < 0 {
		return nil, refuse(RefusedTemplate, "template %q needs a container named %s to complete", TemplateGateway, ContainerProxy)
	}
	if err := inj.checkUIDs(spec); err != nil {
		return nil, err
	}
	agent, err := inj.agentContainer(nil)
	if err != nil {
		return nil, err
	}
	proxy, err := inj.proxyContainer(bootstrap.Router, meta.Labels)
	if err != nil {
		return nil, err
	}
	// The chart's placeholder keeps its ports and any resources or probes
	// it sets; the rest is the injector's.
	own := spec.Containers[i]
	if own.Image != "" && own.Image != "auto" {
		proxy.Image = own.Image
	}
	proxy.Ports = own.Ports
	if !isEmpty(own.Resources) {
		proxy.Resources = own.Resources
	}
	if own.ReadinessProbe != nil {
		proxy.ReadinessProbe = own.ReadinessProbe
	}
	if own.LivenessProbe != nil {
		proxy.LivenessProbe = own.LivenessProbe
	}
	proxy.StartupProbe = nil
	spec.Containers[i] = proxy
	spec.InitContainers = append([]corev1.Container{agent}, spec.InitContainers...)
	addVolumes(spec, inj.volumes())
	setLabel(meta, LabelProxy, string(bootstrap.Router))
	return &status{
		Template:       TemplateGateway,
		InitContainers: []string{ContainerAgent},
		Containers:     []string{ContainerProxy},
		Volumes:        []string{VolumeSocket, VolumeToken, VolumeCARoot},
	}, nil
}

// checkUIDs refuses containers set to run as the proxy's uid or gid: their
// traffic would not be captured.
func (inj *Injector) checkUIDs(spec *corev1.PodSpec) error {
	check := func(who string, uid, gid *int64) error {
		if uid != nil && *uid == inj.s.Proxy.UID {
			return refuse(RefusedProxyUID, "%s runs as uid %d, the proxy's, whose traffic is never captured", who, *uid)
		}
		if gid != nil && *gid == inj.s.Proxy.GID {
			return refuse(RefusedProxyUID, "%s runs as gid %d, the proxy's, whose traffic is never captured", who, *gid)
		}
		return nil
	}
	if sc := spec.SecurityContext; sc != nil {
		if err := check("the pod", sc.RunAsUser, sc.RunAsGroup); err != nil {
			return err
		}
		if slices.Contains(sc.SupplementalGroups, inj.s.Proxy.GID) {
			return refuse(RefusedProxyUID, "the pod has supplemental group %d, the proxy's, whose traffic is never captured", inj.s.Proxy.GID)
		}
	}
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		if c.Name == ContainerProxy {
			continue
		}
		if sc := c.SecurityContext; sc != nil {
			if err := check("container "+c.Name, sc.RunAsUser, sc.RunAsGroup); err != nil {
				return err
			}
		}
	}
	return nil
}

// addVolumes adds the injected volumes. The projected token needs a named
// service account, so the default one is named explicitly, as the
// ServiceAccount admission plugin would before the webhook runs.
func addVolumes(spec *corev1.PodSpec, vols []corev1.Volume) {
	spec.Volumes = append(spec.Volumes, vols...)
	if spec.ServiceAccountName == "" {
		spec.ServiceAccountName = "default"
	}
}

func setLabel(meta *metav1.ObjectMeta, k, v string) {
	if meta.Labels == nil {
		meta.Labels = map[string]string{}
	}
	meta.Labels[k] = v
}

func ptr[T any](v T) *T { return &v }

func (inj *Injector) bootstrap(t bootstrap.NodeType, labels map[string]string) (string, error) {
	b, err := bootstrap.Build(bootstrap.Config{
		Type:          t,
		XDSAddress:    inj.s.XDSAddress,
		XDSServerID:   inj.s.cpID,
		SDSSocket:     SocketPath,
		AdminPort:     PortAdmin,
		ReadinessPort: PortReadiness,
		ClusterDomain: inj.s.ClusterDomain,
		TrustDomain:   inj.s.td,
		Labels:        labels,
	})
	if err != nil {
		return "", err
	}
	return bootstrap.JSON(b)
}

func fieldEnv(name, path string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{
		APIVersion: "v1", FieldPath: path,
	}}}
}

func podEnv() []corev1.EnvVar {
	return []corev1.EnvVar{
		fieldEnv(bootstrap.EnvPodName, "metadata.name"),
		fieldEnv(bootstrap.EnvPodNamespace, "metadata.namespace"),
		fieldEnv(bootstrap.EnvInstanceIP, "status.podIP"),
		fieldEnv(bootstrap.EnvServiceAccount, "spec.serviceAccountName"),
	}
}

func (inj *Injector) proxySecurityContext() *corev1.SecurityContext {
	return &corev1.SecurityContext{
		RunAsUser:                ptr(inj.s.Proxy.UID),
		RunAsGroup:               ptr(inj.s.Proxy.GID),
		RunAsNonRoot:             ptr(true),
		Privileged:               ptr(false),
		AllowPrivilegeEscalation: ptr(false),
		ReadOnlyRootFilesystem:   ptr(true),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
}

func httpProbe(path string, port int32, period, failures int32) *corev1.Probe {
	return &corev1.Probe{
		ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
			Path: path, Port: intstr.FromInt32(port), Scheme: corev1.URISchemeHTTP,
		}},
		TimeoutSeconds: 3, PeriodSeconds: period, FailureThreshold: failures, SuccessThreshold: 1,
	}
}

func (inj *Injector) agentContainer(probers probe.Probers) (corev1.Container, error) {
	env := podEnv()
	if len(probers) > 0 {
		text, err := probers.Encode()
		if err != nil {
			return corev1.Container{}, err
		}
		env = append(env, corev1.EnvVar{Name: probe.EnvVar, Value: text})
	}
	return corev1.Container{
		Name:            ContainerAgent,
		Image:           inj.s.Agent.Image,
		ImagePullPolicy: inj.s.ImagePullPolicy,
		RestartPolicy:   ptr(corev1.ContainerRestartPolicyAlways),
		Command:         []string{AgentCommand},
		Args: []string{
			"--ca-address", inj.s.CAAddress,
			"--ca-bundle", CARootDir + "/" + RootCertKey,
			"--token-file", TokenDir + "/" + TokenFile,
			"--socket", SocketPath,
			"--spiffe-id", fmt.Sprintf("spiffe://%s/ns/$(%s)/sa/$(%s)", inj.s.td.Name(),
				bootstrap.EnvPodNamespace, bootstrap.EnvServiceAccount),
			"--listen-monitoring", fmt.Sprintf(":%d", PortAgent),
		},
		Env:             env,
		Resources:       *inj.s.Agent.Resources.DeepCopy(),
		SecurityContext: inj.proxySecurityContext(),
		// Envoy starts only once the agent holds a certificate.
		StartupProbe:   httpProbe("/healthz", PortAgent, 1, 600),
		ReadinessProbe: httpProbe("/healthz", PortAgent, 10, 3),
		VolumeMounts: []corev1.VolumeMount{
			{Name: VolumeSocket, MountPath: SocketDir},
			{Name: VolumeToken, MountPath: TokenDir, ReadOnly: true},
			{Name: VolumeCARoot, MountPath: CARootDir, ReadOnly: true},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}, nil
}

func (inj *Injector) proxyContainer(t bootstrap.NodeType, labels map[string]string) (corev1.Container, error) {
	labels = maps.Clone(labels)
	delete(labels, LabelProxy)
	boot, err := inj.bootstrap(t, labels)
	if err != nil {
		return corev1.Container{}, fmt.Errorf("injector: %w", err)
	}
	return corev1.Container{
		Name:            ContainerProxy,
		Image:           inj.s.Proxy.Image,
		ImagePullPolicy: inj.s.ImagePullPolicy,
		Command:         []string{"envoy"},
		Args: []string{
			"--config-yaml", boot,
			"--disable-hot-restart",
			"--log-level", inj.s.Proxy.LogLevel,
			"--concurrency", strconv.Itoa(int(inj.s.Proxy.Concurrency)),
		},
		Env:             podEnv(),
		Resources:       *inj.s.Proxy.Resources.DeepCopy(),
		SecurityContext: inj.proxySecurityContext(),
		// The application starts only once Envoy has its configuration.
		StartupProbe:             httpProbe(bootstrap.ReadinessPath, PortReadiness, 1, 600),
		ReadinessProbe:           httpProbe(bootstrap.ReadinessPath, PortReadiness, 10, 3),
		VolumeMounts:             []corev1.VolumeMount{{Name: VolumeSocket, MountPath: SocketDir}},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}, nil
}

func (inj *Injector) initContainer(rules capture.Config) corev1.Container {
	return corev1.Container{
		Name:            ContainerInit,
		Image:           inj.s.ProxyInit.Image,
		ImagePullPolicy: inj.s.ImagePullPolicy,
		Command:         []string{"/bin/sh", "-c", rules.Script()},
		Resources:       *inj.s.ProxyInit.Resources.DeepCopy(),
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                ptr(int64(0)),
			RunAsGroup:               ptr(int64(0)),
			RunAsNonRoot:             ptr(false),
			Privileged:               ptr(false),
			AllowPrivilegeEscalation: ptr(false),
			// iptables takes its lock in /run.
			ReadOnlyRootFilesystem: ptr(false),
			Capabilities: &corev1.Capabilities{
				Add:  []corev1.Capability{"NET_ADMIN", "NET_RAW"},
				Drop: []corev1.Capability{"ALL"},
			},
			SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
}

func (inj *Injector) volumes() []corev1.Volume {
	return []corev1.Volume{
		{Name: VolumeSocket, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}}},
		{Name: VolumeToken, VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
				Audience: inj.s.TokenAudience, ExpirationSeconds: ptr(int64(TokenLifetime)), Path: TokenFile,
			}}},
		}}},
		{Name: VolumeCARoot, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: RootCertConfigMap},
			Items:                []corev1.KeyToPath{{Key: RootCertKey, Path: RootCertKey}},
		}}},
	}
}
