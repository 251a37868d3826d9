package injector

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// ObjectResult is what happened to one object of a manifest.
type ObjectResult struct {
	APIVersion, Kind, Namespace, Name string
	// Workload is false for objects that hold no pod template, which are
	// copied through unchanged.
	Workload bool
	Result   Result
}

// workload is an object kind with a pod template.
type workload struct {
	new func() any
	// template returns the object's metadata and its pod's.
	template func(obj any) (*metav1.ObjectMeta, *metav1.ObjectMeta, *corev1.PodSpec)
}

var workloads = map[metav1.TypeMeta]workload{
	{APIVersion: "v1", Kind: "Pod"}: {func() any { return &corev1.Pod{} }, func(o any) (*metav1.ObjectMeta, *metav1.ObjectMeta, *corev1.PodSpec) {
		p := o.(*corev1.Pod)
		return &p.ObjectMeta, &p.ObjectMeta, &p.Spec
	}},
	{APIVersion: "apps/v1", Kind: "Deployment"}: {func() any { return &appsv1.Deployment{} }, func(o any) (*metav1.ObjectMeta, *metav1.ObjectMeta, *corev1.PodSpec) {
		d := o.(*appsv1.Deployment)
		return &d.ObjectMeta, &d.Spec.Template.ObjectMeta, &d.Spec.Template.Spec
	}},
	{APIVersion: "apps/v1", Kind: "StatefulSet"}: {func() any { return &appsv1.StatefulSet{} }, func(o any) (*metav1.ObjectMeta, *metav1.ObjectMeta, *corev1.PodSpec) {
		d := o.(*appsv1.StatefulSet)
		return &d.ObjectMeta, &d.Spec.Template.ObjectMeta, &d.Spec.Template.Spec
	}},
	{APIVersion: "apps/v1", Kind: "DaemonSet"}: {func() any { return &appsv1.DaemonSet{} }, func(o any) (*metav1.ObjectMeta, *metav1.ObjectMeta, *corev1.PodSpec) {
		d := o.(*appsv1.DaemonSet)
		return &d.ObjectMeta, &d.Spec.Template.ObjectMeta, &d.Spec.Template.Spec
	}},
	{APIVersion: "apps/v1", Kind: "ReplicaSet"}: {func() any { return &appsv1.ReplicaSet{} }, func(o any) (*metav1.ObjectMeta, *metav1.ObjectMeta, *corev1.PodSpec) {
		d := o.(*appsv1.ReplicaSet)
		return &d.ObjectMeta, &d.Spec.Template.ObjectMeta, &d.Spec.Template.Spec
	}},
	{APIVersion: "batch/v1", Kind: "Job"}: {func() any { return &batchv1.Job{} }, func(o any) (*metav1.ObjectMeta, *metav1.ObjectMeta, *corev1.PodSpec) {
		d := o.(*batchv1.Job)
		return &d.ObjectMeta, &d.Spec.Template.ObjectMeta, &d.Spec.Template.Spec
	}},
	{APIVersion: "batch/v1", Kind: "CronJob"}: {func() any { return &batchv1.CronJob{} }, func(o any) (*metav1.ObjectMeta, *metav1.ObjectMeta, *corev1.PodSpec) {
		d := o.(*batchv1.CronJob)
		return &d.ObjectMeta, &d.Spec.JobTemplate.Spec.Template.ObjectMeta, &d.Spec.JobTemplate.Spec.Template.Spec
	}},
}

// InjectManifests injects every Pod, Deployment, StatefulSet, DaemonSet,
// ReplicaSet, Job and CronJob in the YAML stream r and writes the stream to
// w, as `istioctl kube-inject` does. Other objects are copied through
// unchanged. Namespace rules apply by each object's metadata.namespace. The
// labels of a namespace cannot be seen offline, except those of the
// Namespace objects in the stream itself (wherever they are in it), which
// put their workloads in ambient mode as the webhook would; the injection
// label is not consulted. The first refusal stops it, naming the object.
func (inj *Injector) InjectManifests(r io.Reader, w io.Writer) ([]ObjectResult, error) {
	reader := utilyaml.NewYAMLReader(bufio.NewReader(r))
	var docs [][]byte
	inStream := map[string]map[string]string{}
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("injector: read manifest: %w", err)
		}
		if isBlank(doc) {
			continue
		}
		docs = append(docs, doc)
		var head struct {
			metav1.TypeMeta `json:",inline"`
			Metadata        metav1.ObjectMeta `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &head); err == nil && head.APIVersion == "v1" && head.Kind == "Namespace" && head.Metadata.Name != "" {
			inStream[head.Metadata.Name] = head.Metadata.Labels
		}
	}
	namespaces := NamespaceLabelsFunc(func(name string) (map[string]string, error) {
		if labels, ok := inStream[name]; ok {
			return labels, nil
		}
		if inj.namespaces != nil {
			return inj.namespaces.NamespaceLabels(name)
		}
		return nil, nil
	})
	var results []ObjectResult
	first := true
	for _, doc := range docs {
		out, res, err := inj.injectDocument(doc, namespaces)
		if err != nil {
			return results, err
		}
		results = append(results, res)
		if !first {
			if _, err := io.WriteString(w, "---\n"); err != nil {
				return results, fmt.Errorf("injector: write: %w", err)
			}
		}
		first = false
		if _, err := w.Write(out); err != nil {
			return results, fmt.Errorf("injector: write: %w", err)
		}
	}
	return results, nil
}

func (inj *Injector) injectDocument(doc []byte, namespaces NamespaceLabels) ([]byte, ObjectResult, error) {
	var head struct {
		metav1.TypeMeta `json:",inline"`
		Metadata        metav1.ObjectMeta `json:"metadata"`
	}
	if err := yaml.Unmarshal(doc, &head); err != nil {
		return nil, ObjectResult{}, fmt.Errorf("injector: parse manifest: %w", err)
	}
	res := ObjectResult{APIVersion: head.APIVersion, Kind: head.Kind, Namespace: head.Metadata.Namespace, Name: head.Metadata.Name}
	wl, ok := workloads[head.TypeMeta]
	if !ok {
		return ensureNewline(doc), res, nil
	}
	res.Workload = true
	obj := wl.new()
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		return nil, res, fmt.Errorf("injector: %s %s: %w", res.Kind, res.Name, err)
	}
	objMeta, podMeta, spec := wl.template(obj)
	r, err := inj.injectPod(objMeta.Namespace, podMeta, spec, namespaces)
	if err != nil {
		return nil, res, fmt.Errorf("%s %s: %w", res.Kind, qualified(objMeta), err)
	}
	res.Result = r
	if !r.Injected {
		return ensureNewline(doc), res, nil
	}
	out, err := encode(obj)
	if err != nil {
		return nil, res, err
	}
	return out, res, nil
}

func qualified(m *metav1.ObjectMeta) string {
	if m.Namespace == "" {
		return m.Name
	}
	return m.Namespace + "/" + m.Name
}

// encode writes obj as YAML without the empty status and null timestamps
// that the typed structs carry.
func encode(obj any) ([]byte, error) {
	raw, err := json.Marshal(obj)
	if err != nil {
		return nil, fmt.Errorf("injector: encode: %w", err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("injector: encode: %w", err)
	}
	prune(m)
	if st, ok := m["status"].(map[string]any); ok && len(st) == 0 {
		delete(m, "status")
	}
	out, err := yaml.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("injector: encode: %w", err)
	}
	return out, nil
}

// prune drops null creationTimestamps and the metadata maps they leave
// empty.
func prune(v any) {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			if k == "creationTimestamp" && x == nil {
				delete(v, k)
				continue
			}
			prune(x)
			if k == "metadata" {
				if m, ok := x.(map[string]any); ok && len(m) == 0 {
					delete(v, k)
				}
			}
		}
	case []any:
		for _, x := range v {
			prune(x)
		}
	}
}

func isBlank(doc []byte) bool {
	for _, line := range bytes.Split(doc, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) > 0 && line[0] != '#' && !bytes.Equal(line, []byte("---")) {
			return false
		}
	}
	return true
}

func ensureNewline(doc []byte) []byte {
	doc = bytes.TrimLeft(doc, "\n")
	if bytes.HasPrefix(doc, []byte("---\n")) {
		doc = doc[4:]
	}
	if len(doc) > 0 && doc[len(doc)-1] != '\n' {
		doc = append(doc, '\n')
	}
	return doc
}
